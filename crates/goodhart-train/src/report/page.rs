//! The page: HTML for the summary and the tables, one JSON object describing every
//! chart, and `report.js`, which draws the charts with uPlot (`uplot/`, v1.6.32, MIT).

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::{
    markers,
    outcome::{fixed, lead_text, verdicts, Verdict},
    samples::Hacks,
    Fit, FitForm, Metrics, Summary, KEY_GOLD, KEY_PROXY,
};

const UPLOT_JS: &str = include_str!("uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("uplot/uPlot.min.css");
const REPORT_JS: &str = include_str!("report.js");
const REPORT_CSS: &str = include_str!("report.css");

/// The smoothing the slider starts at (TensorBoard's default).
const SMOOTHING: f64 = 0.6;
/// Points of each fitted law's curve.
const FIT_POINTS: usize = 120;
/// The detector markers' colour.
const DETECTOR: &str = "#c0392b";

/// HTML-escapes `&`, `<`, `>`, `"` and `'`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number for a table: integers exactly, others to 4 significant digits.
pub(super) fn number(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-3..6).contains(&mag) {
        return format!("{v:.3e}");
    }
    let dec = (3 - mag).max(0) as usize;
    let s = format!("{v:.dec$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A JSON value as table text (not yet escaped).
pub(super) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
    "#ff9da7", "#bab0ac",
];
const NEUTRAL: &str = "#555555";

fn table_html(title: &str, columns: &[String], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table>");
    if !title.is_empty() {
        let _ = write!(s, "<caption>{}</caption>", escape(title));
    }
    s.push_str("<thead><tr>");
    for c in columns {
        let _ = write!(s, "<th>{}</th>", escape(c));
    }
    s.push_str("</tr></thead><tbody>\n");
    for row in rows {
        s.push_str("<tr>");
        for c in row {
            let class = if c.parse::<f64>().is_ok() {
                r#" class="num""#
            } else {
                ""
            };
            let _ = write!(s, "<td{class}>{}</td>", escape(c));
        }
        // Short rows are padded so the grid stays rectangular.
        for _ in row.len()..columns.len() {
            s.push_str("<td></td>");
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody></table>\n");
    s
}

/// TensorBoard's smoothing, as the report's slider applies it: a debiased exponential
/// moving average, `m_i = w m_{i-1} + (1 - w) y_i` from `m_0 = 0`, shown as
/// `m_i / (1 - w^i)`. `w = 0` returns `ys` unchanged.
///
/// ```
/// use goodhart_train::report::ema;
/// // w = 0.5: 0.5 / 0.5 = 1, then (0.25 + 1) / 0.75 = 5/3.
/// let s = ema(&[1.0, 2.0], 0.5);
/// assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - 5.0 / 3.0).abs() < 1e-12);
/// ```
pub fn ema(ys: &[f64], w: f64) -> Vec<f64> {
    let mut last = 0.0;
    let mut n = 0;
    ys.iter()
        .map(|&y| {
            if w <= 0.0 {
                return y;
            }
            last = last * w + (1.0 - w) * y;
            n += 1;
            last / (1.0 - w.powi(n))
        })
        .collect()
}

/// A chart for `report.js`.
#[derive(Debug, Serialize)]
struct Chart {
    /// The `data-chart` id of its container.
    id: String,
    /// An x axis of steps: smoothed by the slider, cursor and zoom linked.
    step: bool,
    /// Drawn above the chart (small multiples; the others follow an `<h2>`).
    title: Option<String>,
    x_label: String,
    /// A small multiple (no legend values column, smaller size).
    small: bool,
    lines: Vec<ChartLine>,
    marks: Vec<Mark>,
}

#[derive(Debug, Serialize)]
struct ChartLine {
    label: String,
    color: &'static str,
    dash: bool,
    /// Points only, no line (and never smoothed).
    dots: bool,
    /// Finite points, sorted by x.
    x: Vec<f64>,
    y: Vec<f64>,
}

impl ChartLine {
    fn new(label: String, color: &'static str, mut points: Vec<(f64, f64)>) -> Self {
        points.retain(|(x, y)| x.is_finite() && y.is_finite());
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (x, y) = points.into_iter().unzip();
        Self {
            label,
            color,
            dash: false,
            dots: false,
            x,
            y,
        }
    }
}

/// A vertical marker, with a dot at `y` when given; hidden with line `line` of its chart.
#[derive(Debug, Serialize)]
struct Mark {
    x: f64,
    y: Option<f64>,
    label: String,
    color: &'static str,
    line: Option<usize>,
}

#[derive(Serialize)]
struct PageData<'a> {
    smoothing: f64,
    charts: &'a [Chart],
}

/// `<div class="chart">` for the chart `id`; `report.js` draws into it.
fn container(html: &mut String, chart: &Chart) {
    let class = if chart.small { "chart small" } else { "chart" };
    let _ = writeln!(
        html,
        r#"<div class="{class}" data-chart="{}"></div>"#,
        escape(&chart.id)
    );
}

fn verdict_html(v: &Verdict) -> String {
    let mut html = String::from(r#"<div class="verdict">"#);
    let name = v.group.as_deref().unwrap_or("run");
    let hacked = v.outcomes.iter().any(|o| o.hacked);
    let badge = match (v.outcomes.is_empty(), hacked) {
        (true, _) => r#"<span class="badge none">not judged</span>"#,
        (false, true) => r#"<span class="badge hacked">hacked</span>"#,
        (false, false) => r#"<span class="badge held">held</span>"#,
    };
    let _ = write!(
        html,
        "<h3>{} {badge}</h3>\n<p class=\"line\">{}</p>\n",
        escape(name),
        escape(&v.line)
    );
    if !v.outcomes.is_empty() {
        let cols: Vec<String> = [
            "series",
            "proxy (first → last)",
            "gold first",
            "gold peak",
            "peak step",
            "gold last",
            "hacked",
            "detectors",
        ]
        .iter()
        .map(|c| c.to_string())
        .collect();
        let rows: Vec<Vec<String>> = v
            .outcomes
            .iter()
            .map(|o| {
                let leads: Vec<String> = o
                    .leads
                    .iter()
                    .map(|l| format!("{} @ {}: {}", l.detector, number(l.step), lead_text(l.lead)))
                    .collect();
                vec![
                    o.series.clone(),
                    o.proxy.map_or("–".into(), |(a, b)| {
                        format!("{} → {}", fixed(a), fixed(b))
                    }),
                    fixed(o.gold_first),
                    fixed(o.peak.value),
                    o.peak.step.to_string(),
                    fixed(o.peak.final_value),
                    if o.hacked { "yes" } else { "no" }.into(),
                    if leads.is_empty() {
                        "none fired".into()
                    } else {
                        leads.join("; ")
                    },
                ]
            })
            .collect();
        html.push_str(&table_html("", &cols, &rows));
    }
    // One note per reason, naming its series.
    let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
    for (series, why) in &v.unjudged {
        match reasons.iter_mut().find(|(r, _)| r == why) {
            Some((_, names)) => names.push(series),
            None => reasons.push((why, vec![series])),
        }
    }
    for (why, names) in reasons {
        let _ = writeln!(
            html,
            r#"<p class="note">Not judged ({}): {}</p>"#,
            escape(why),
            escape(&names.join(", "))
        );
    }
    html.push_str("</div>\n");
    html
}

fn hacks_html(h: &Hacks) -> String {
    let title = match &h.group {
        Some(g) => format!("{g}: the responses the proxy overrated most"),
        None => "The responses the proxy overrated most".into(),
    };
    let cols: Vec<String> = [
        "series",
        "step",
        "prompt",
        "proxy",
        "gold",
        "proxy − gold",
        "response",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    let rows: Vec<Vec<String>> = h
        .top
        .iter()
        .map(|x| {
            vec![
                x.series.clone(),
                x.step.to_string(),
                x.prompt.clone(),
                fixed(x.proxy),
                fixed(x.gold),
                fixed(x.gap()),
                x.text.clone(),
            ]
        })
        .collect();
    let mut html = table_html(&title, &cols, &rows);
    let _ = writeln!(
        html,
        r#"<p class="note">{} distinct responses of {} scored samples, largest proxy − gold first.</p>"#,
        h.top.len(),
        h.scored
    );
    html
}

/// Renders the report of `metrics`, `summary` and the overrated responses `hacks` as
/// one self-contained HTML page; `title` names the run (escaped here).
pub fn render(
    title: &str,
    metrics: &Metrics,
    summary: Option<&Summary>,
    hacks: &[Hacks],
) -> String {
    let color = |i: usize| PALETTE[i % PALETTE.len()];
    let color_of = |name: &str| {
        metrics
            .series
            .iter()
            .position(|s| s.name == name)
            .map_or(NEUTRAL, color)
    };
    let marks = markers(metrics, summary);
    let verdicts = verdicts(metrics, &marks);
    let mut charts: Vec<Chart> = Vec::new();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t} · goodhart report</title>\n<style>\n{UPLOT_CSS}\n{REPORT_CSS}</style>\n\
         <script>\n{UPLOT_JS}\n</script>\n</head>\n<body>\n\
         <h1>{t}</h1>\n<p class=\"meta\">goodhart run report · {n} series · {k} steps logged</p>\n",
        t = escape(title),
        n = metrics.series.len(),
        k = metrics.series.iter().map(|s| s.rows.len()).sum::<usize>(),
    );

    // The summary: one verdict per experiment.
    html.push_str("<section id=\"summary\">\n<h2>Summary</h2>\n");
    html.push_str(
        "<p class=\"note\">Gold and proxy are smoothed by a centred moving average of 5 \
         points. A series hacked when its proxy rose while its final gold ended below its \
         peak by at least a tenth of its gain from the first value to the peak, and by more \
         than twice the drop's standard error. A detector's lead is counted from its firing \
         to the gold peak.</p>\n",
    );
    for v in &verdicts {
        html.push_str(&verdict_html(v));
    }
    html.push_str("</section>\n");

    html.push_str(
        "<div class=\"controls\"><label>Smoothing <input type=\"range\" id=\"smoothing\" \
         min=\"0\" max=\"0.99\" step=\"0.01\"></label> <output id=\"smoothing-value\"></output>\
         <span class=\"hint\">Drag across a chart to zoom every step chart, double-click to \
         reset; click a legend entry to hide its line; hover for values.</span></div>\n",
    );

    // Proxy and gold against step, one chart per experiment.
    let mut groups: Vec<Option<&str>> = Vec::new();
    for s in &metrics.series {
        if !groups.contains(&s.group.as_deref()) {
            groups.push(s.group.as_deref());
        }
    }
    for (g, group) in groups.iter().enumerate() {
        let mut chart = Chart {
            id: format!("rewards-{g}"),
            step: true,
            title: None,
            x_label: "step".into(),
            small: false,
            lines: Vec::new(),
            marks: Vec::new(),
        };
        for (i, s) in metrics.series.iter().enumerate() {
            if s.group.as_deref() != *group {
                continue;
            }
            let (proxy, gold) = (s.points(KEY_PROXY), s.points(KEY_GOLD));
            let gold_line = (!gold.is_empty()).then_some(chart.lines.len());
            if !gold.is_empty() {
                chart
                    .lines
                    .push(ChartLine::new(format!("{} gold", s.name), color(i), gold));
            }
            if !proxy.is_empty() {
                let mut l = ChartLine::new(format!("{} proxy", s.name), color(i), proxy);
                l.dash = true;
                chart.lines.push(l);
            }
            let at = gold_line.or(chart.lines.len().checked_sub(1));
            if let Some(o) = verdicts
                .iter()
                .flat_map(|v| &v.outcomes)
                .find(|o| o.series == s.name)
            {
                chart.marks.push(Mark {
                    x: o.peak.step as f64,
                    y: Some(o.peak.value),
                    label: String::new(),
                    color: color(i),
                    line: gold_line,
                });
            }
            for m in marks.iter().filter(|m| match &m.series {
                Some(n) => *n == s.name,
                None => metrics.series.len() == 1,
            }) {
                chart.marks.push(Mark {
                    x: m.step,
                    y: None,
                    label: m.label(),
                    color: DETECTOR,
                    line: at,
                });
            }
        }
        // Summary firings of a series the metrics do not name are marked on every chart.
        for m in marks.iter().filter(|m| {
            m.series
                .as_deref()
                .is_some_and(|n| metrics.series.iter().all(|s| s.name != n))
        }) {
            chart.marks.push(Mark {
                x: m.step,
                y: None,
                label: m.label(),
                color: DETECTOR,
                line: None,
            });
        }
        if chart.lines.is_empty() {
            continue;
        }
        let title = match group {
            Some(g) => format!("Proxy and gold reward: {g}"),
            None => "Proxy and gold reward".to_string(),
        };
        let _ = writeln!(
            html,
            "<h2>{}</h2>\n<p class=\"note\">Gold solid, proxy dashed; circles: smoothed \
             gold peaks; red: detector firings.</p>",
            escape(&title)
        );
        container(&mut html, &chart);
        charts.push(chart);
    }

    // The summary's own charts.
    for (c, spec) in summary
        .map(|s| s.charts.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let lines: Vec<ChartLine> = spec
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let pts = l
                    .points
                    .iter()
                    .filter_map(|p| Some((p[0]?, p[1]?)))
                    .collect();
                let mut line = ChartLine::new(l.label.clone(), color(i), pts);
                line.dash = l.dashed;
                line
            })
            .collect();
        if lines.iter().all(|l| l.x.is_empty()) {
            continue;
        }
        let chart = Chart {
            id: format!("summary-{c}"),
            step: false,
            title: None,
            x_label: spec.x_label.clone(),
            small: false,
            lines,
            marks: spec
                .marks
                .iter()
                .filter(|m| m.x.is_finite())
                .map(|m| Mark {
                    x: m.x,
                    y: None,
                    label: m.label.clone().unwrap_or_default(),
                    color: NEUTRAL,
                    line: None,
                })
                .collect(),
        };
        let _ = writeln!(html, "<h2>{}</h2>", escape(&spec.title));
        container(&mut html, &chart);
        charts.push(chart);
    }

    // Gold against sqrt(KL), with the fits.
    let fits = summary.map(|s| s.fits.as_slice()).unwrap_or_default();
    let mut chart = Chart {
        id: "gold-d".into(),
        step: false,
        title: None,
        x_label: "d = √KL(π ‖ π_ref)".into(),
        small: false,
        lines: Vec::new(),
        marks: Vec::new(),
    };
    for (i, s) in metrics.series.iter().enumerate() {
        let pts = s.gold_vs_d();
        if !pts.is_empty() {
            let mut l = ChartLine::new(s.name.clone(), color(i), pts);
            l.dots = true;
            chart.lines.push(l);
        }
    }
    if !chart.lines.is_empty() || !fits.is_empty() {
        let d_max = chart
            .lines
            .iter()
            .flat_map(|l| l.x.iter().copied())
            .chain(fits.iter().filter_map(Fit::peak))
            .fold(0.0_f64, f64::max)
            .max(1e-9);
        for f in fits {
            let c = f.series.as_deref().map_or(NEUTRAL, color_of);
            let pts = (0..=FIT_POINTS)
                .map(|k| d_max * k as f64 / FIT_POINTS as f64)
                .map(|d| (d, f.eval(d)))
                .collect();
            let label = format!("{} fit", f.series.as_deref().unwrap_or("law"));
            chart.lines.push(ChartLine::new(label, c, pts));
            if let Some(d) = f.peak() {
                chart.marks.push(Mark {
                    x: d,
                    y: Some(f.eval(d)),
                    label: format!("peak d* = {}", number(d)),
                    color: c,
                    line: Some(chart.lines.len() - 1),
                });
            }
        }
        html.push_str("<h2>Gold reward against √KL</h2>\n");
        container(&mut html, &chart);
        charts.push(chart);
        if !fits.is_empty() {
            let cols: Vec<String> = [
                "series",
                "law",
                "alpha",
                "beta",
                "offset",
                "R²",
                "peak d*",
                "gold at peak",
            ]
            .iter()
            .map(|c| c.to_string())
            .collect();
            let rows: Vec<Vec<String>> = fits
                .iter()
                .map(|f| {
                    let p = f.peak();
                    let law = match f.form {
                        FitForm::Rl => "RL: c + d (α − β ln d)",
                        FitForm::Bon => "best-of-n: c + d (α − β d)",
                    };
                    vec![
                        f.series.clone().unwrap_or_else(|| "–".into()),
                        law.into(),
                        number(f.alpha),
                        number(f.beta),
                        number(f.offset),
                        f.r2.map_or("–".into(), number),
                        p.map_or("none".into(), number),
                        p.map_or("–".into(), |d| number(f.eval(d))),
                    ]
                })
                .collect();
            html.push_str(&table_html("Fitted laws (Gao et al. 2022)", &cols, &rows));
        }
    }

    // What the policies learned to do.
    if !hacks.is_empty() {
        html.push_str("<section id=\"responses\">\n<h2>Responses</h2>\n");
        for h in hacks {
            html.push_str(&hacks_html(h));
        }
        html.push_str("</section>\n");
    }

    // Detections.
    if !marks.is_empty() {
        html.push_str("<h2>Detections</h2>\n");
        let cols: Vec<String> = ["detector", "series", "step", "reason"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let rows: Vec<Vec<String>> = marks
            .iter()
            .map(|m| {
                vec![
                    m.detector.clone(),
                    m.series.clone().unwrap_or_else(|| "–".into()),
                    number(m.step),
                    m.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        html.push_str(&table_html("", &cols, &rows));
    }

    // The summary's tables and figures.
    if let Some(s) = summary {
        if !s.tables.is_empty() {
            html.push_str("<h2>Tables</h2>\n");
        }
        for t in &s.tables {
            let cols: Vec<String> = t.columns.iter().map(cell).collect();
            let rows: Vec<Vec<String>> = t
                .rows
                .iter()
                .map(|r| r.iter().map(cell).collect())
                .collect();
            html.push_str(&table_html(&t.title, &cols, &rows));
        }
        if !s.scalars.is_empty() {
            let rows: Vec<Vec<String>> = s
                .scalars
                .iter()
                .map(|(k, v)| vec![k.clone(), v.clone()])
                .collect();
            let _ = writeln!(
                html,
                "<details class=\"figures\"><summary>Figures of summary.json ({})</summary>",
                rows.len()
            );
            html.push_str(&table_html("", &["figure".into(), "value".into()], &rows));
            html.push_str("</details>\n");
        }
    }

    // Small multiples: every other metric against step.
    let others: Vec<&String> = metrics
        .keys
        .iter()
        .filter(|k| *k != KEY_PROXY && *k != KEY_GOLD && super::detector_name(k).is_none())
        .collect();
    if !others.is_empty() {
        html.push_str("<h2>Metrics</h2>\n<div class=\"grid-charts\">\n");
        let mut empty = Vec::new();
        for (k, key) in others.into_iter().enumerate() {
            let lines: Vec<ChartLine> = metrics
                .series
                .iter()
                .enumerate()
                .map(|(i, s)| ChartLine::new(s.name.clone(), color(i), s.points(key)))
                .filter(|l| !l.x.is_empty())
                .collect();
            if lines.is_empty() {
                empty.push(key.as_str());
                continue;
            }
            let chart = Chart {
                id: format!("metric-{k}"),
                step: true,
                title: Some(key.clone()),
                x_label: "step".into(),
                small: true,
                lines,
                marks: marks
                    .iter()
                    .map(|m| Mark {
                        x: m.step,
                        y: None,
                        label: String::new(),
                        color: DETECTOR,
                        line: None,
                    })
                    .collect(),
            };
            container(&mut html, &chart);
            charts.push(chart);
        }
        html.push_str("</div>\n");
        if !empty.is_empty() {
            let _ = writeln!(
                html,
                r#"<p class="note">No finite values: {}</p>"#,
                escape(&empty.join(", "))
            );
        }
    }

    // The charts' data, then the script that draws them. `<` is escaped so no string
    // from the files can close the script element.
    let data = serde_json::to_string(&PageData {
        smoothing: SMOOTHING,
        charts: &charts,
    })
    .expect("chart data serialises")
    .replace('<', "\\u003c");
    let _ = write!(
        html,
        "<script type=\"application/json\" id=\"goodhart-data\">{data}</script>\n\
         <script>\n{REPORT_JS}</script>\n</body>\n</html>\n"
    );
    html
}

/// The `data-chart` ids `render` drew, in page order (for tests and the browser check).
pub fn chart_ids(html: &str) -> Vec<String> {
    html.split("data-chart=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(str::to_string)
        .collect()
}
