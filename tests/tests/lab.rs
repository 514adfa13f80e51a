//! The lab end to end on ndarray: a tiny version of each preset through the same code
//! path as `cargo xtask run` (config -> checkpointed stages -> metrics.jsonl,
//! summary.json, report.html), two processes writing the same bytes, and runs killed
//! with SIGKILL then resumed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use goodhart_core::device::Autodiff;
use goodhart_core::testing::TempDir;
use goodhart_train::{config::ExperimentConfig, experiments, presets, runner::Runner};
use serde_json::{json, Value};

mod browser;

type B = Autodiff<goodhart_core::device::Dispatch>;

/// Overrides that shrink every preset to seconds.
const TINY: &[&str] = &[
    "tomato.seeds=2",
    "tomato.action_kl=[0.1]",
    "tomato.chi2=[0.1]",
    "tomato.eval_episodes=4",
    "tomato.base={iterations = 3, envs = 4}",
    "tomato.ppo={iterations = 3, envs = 4}",
    "sft={examples = 64, heldout = 16, steps = 4, batch = 8}",
    "proxy={epochs = 1, heldout_pairs = 16, pearson_samples = 16}",
    "rl={steps = 4, prompts_per_step = 2, group_size = 4}",
    "overopt.pairs=[20, 40]",
    "overopt.best_of_n={ns = [1, 2, 4], samples_per_prompt = 4, prompts = 2}",
    "mitigations.seeds=2",
    "mitigations.pairs=20",
];

/// A run root removed with its contents when the test ends.
fn scratch(tag: &str) -> TempDir {
    TempDir::new(&format!("lab-{tag}"))
}

/// The preset with the tiny overrides that apply to its sections.
fn tiny(preset: &str, extra: &[&str]) -> ExperimentConfig {
    let text = presets::preset(preset).expect("preset exists");
    let table: toml::Table = text.parse().unwrap();
    let sets: Vec<String> = TINY
        .iter()
        .chain(extra)
        .filter(|s| {
            let section = s.split(['.', '=']).next().unwrap();
            table.contains_key(section) || ["sft", "proxy", "rl", "seed", "daa"].contains(&section)
        })
        .map(|s| s.to_string())
        .collect();
    ExperimentConfig::parse(text, &sets).unwrap_or_else(|e| panic!("{preset}: {e}"))
}

fn run(config: ExperimentConfig, root: &Path) -> (PathBuf, Value) {
    run_with_tensorboard(config, root, None)
}

fn run_with_tensorboard(
    config: ExperimentConfig,
    root: &Path,
    tensorboard: Option<PathBuf>,
) -> (PathBuf, Value) {
    let mut runner = Runner::create(root, config)
        .unwrap()
        .quiet(true)
        .tensorboard(tensorboard);
    let summary = experiments::run::<B>(&mut runner, &goodhart_core::device::cpu()).unwrap();
    (runner.dir().path().to_path_buf(), summary)
}

fn table<'a>(summary: &'a Value, title_start: &str) -> &'a Vec<Value> {
    summary["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["title"].as_str().unwrap().starts_with(title_start))
        .unwrap_or_else(|| panic!("no table `{title_start}`"))["rows"]
        .as_array()
        .unwrap()
}

fn metric_lines(dir: &Path) -> Vec<serde_json::Map<String, Value>> {
    jsonl(dir, "metrics.jsonl")
}

fn jsonl(dir: &Path, file: &str) -> Vec<serde_json::Map<String, Value>> {
    goodhart_metrics::sink::read_objects(dir.join(file)).unwrap()
}

/// The run's files, its config reading back, and its report checked in headless
/// Chromium ([`browser::check_report`]; the screenshot is named `name`).
fn assert_run_files(dir: &Path, name: &str) -> Option<browser::Browser> {
    for f in [
        "config.toml",
        "metrics.jsonl",
        "samples.jsonl",
        "summary.json",
        "report.html",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    let browser = browser::check_report(dir, name);
    // The resolved config reads back as the same experiment.
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    ExperimentConfig::parse(&text, &[]).unwrap();
    browser
}

/// TensorBoard's own reader (`tests/scripts/read_tensorboard.py`) returns every finite
/// metric of `metrics.jsonl`, as `f32`, at its step, in the run `<experiment>/<series>`,
/// and nothing else. `GOODHART_TENSORBOARD=off` skips the check where the Python package
/// `tensorboard` is not installed (`.ci/run` installs it).
fn assert_tensorboard_reads_back(dir: &Path, tb: &Path) {
    if std::env::var("GOODHART_TENSORBOARD").is_ok_and(|v| v == "off") {
        eprintln!("GOODHART_TENSORBOARD=off: the TensorBoard read-back is skipped");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/read_tensorboard.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(tb)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "TensorBoard's reader failed (pip install tensorboard, as .ci/run does, or set \
         GOODHART_TENSORBOARD=off): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut want: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, Vec<(u64, f32)>>,
    > = Default::default();
    for line in metric_lines(dir) {
        let run = format!(
            "{}/{}",
            line["experiment"].as_str().unwrap(),
            line["series"].as_str().unwrap()
        );
        for (k, v) in &line {
            if let Some(x) = v.as_f64().filter(|x| x.is_finite() && k != "step") {
                want.entry(run.clone())
                    .or_default()
                    .entry(k.clone())
                    .or_default()
                    .push((line["step"].as_u64().unwrap(), x as f32));
            }
        }
    }
    let runs: Vec<&String> = read.as_object().unwrap().keys().collect();
    assert_eq!(runs, want.keys().collect::<Vec<_>>());
    let mut scalars = 0;
    for (run, tags) in &want {
        let got = read[run].as_object().unwrap();
        assert_eq!(got.len(), tags.len(), "{run}: tags");
        for (tag, points) in tags {
            let got: Vec<(u64, f32)> = serde_json::from_value(got[tag].clone()).unwrap();
            assert_eq!(&got, points, "{run} {tag}");
            scalars += points.len();
        }
    }
    assert!(scalars > 50, "{scalars} scalars compared");
}

#[test]
fn tiny_tomato_preset() {
    let root = scratch("tomato");
    let (dir, s) = run(tiny("tomato", &[]), &root);
    let _ = assert_run_files(&dir, "tomato");
    // base, proxy, one action-KL and one chi2 coefficient.
    let rows = table(&s, "Tomato");
    let methods: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(methods, ["base", "proxy", "action_kl", "chi2"]);
    for r in rows {
        assert_eq!(r[7], 2, "two seeds per arm");
        // Returns are sums of 100 steps of at most 26 * 0.02 per step.
        let t = r[2].as_f64().unwrap();
        assert!((0.0..=52.0).contains(&t), "true return {t}");
    }
    let hacked = s["tomato"]["hacked_seeds"].as_u64().unwrap();
    assert!(hacked <= 2);
    // Every PPO iteration of every arm and seed logged proxy and gold: 4 arms x 2 seeds
    // x 3 iterations.
    let lines = metric_lines(&dir);
    assert_eq!(lines.len(), 4 * 2 * 3);
    assert!(lines
        .iter()
        .all(|l| l["reward/gold/mean"].is_number() && l["reward/proxy/mean"].is_number()));
}

#[test]
fn tiny_overopt_preset() {
    let root = scratch("overopt");
    let (dir, s) = run(tiny("overopt", &[]), &root);
    let _ = assert_run_files(&dir, "overopt");
    let rows = table(&s, "Overoptimisation");
    assert_eq!(rows.len(), 2, "one row per proxy size");
    assert_eq!(
        (rows[0][0].as_u64(), rows[1][0].as_u64()),
        (Some(20), Some(40))
    );
    // An RL and a best-of-n fit for each proxy, in the report's format.
    let fits = s["fit"].as_array().unwrap();
    let forms: Vec<&str> = fits.iter().map(|f| f["form"].as_str().unwrap()).collect();
    assert_eq!(forms.iter().filter(|f| **f == "bon").count(), 2);
    for f in fits {
        assert!(f["alpha"].is_number() && f["beta"].is_number());
    }
    // RL lines carry d = sqrt(KL) and both rewards; best-of-n lines one per n.
    let lines = metric_lines(&dir);
    let rl: Vec<_> = lines.iter().filter(|l| l["series"] == "rl p20").collect();
    assert_eq!(rl.len(), 4);
    assert!(rl.iter().all(|l| l["kl/d"].as_f64().unwrap() >= 0.0));
    // samples.jsonl: each RL step's 2 x 4 responses with proxy and gold, whose means are
    // the step line's.
    let samples = jsonl(&dir, "samples.jsonl");
    for l in &rl {
        let mine: Vec<_> = samples
            .iter()
            .filter(|s| s["series"] == "rl p20" && s["step"] == l["step"])
            .collect();
        assert_eq!(mine.len(), 8);
        for (sample_key, step_key) in [("proxy", "reward/proxy/mean"), ("gold", "reward/gold/mean")]
        {
            let mean = mine
                .iter()
                .map(|s| s["rewards"][sample_key].as_f64().unwrap())
                .sum::<f64>()
                / 8.0;
            let want = l[step_key].as_f64().unwrap();
            assert!(
                (mean - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{sample_key}: {mean} vs {want}"
            );
        }
    }
    assert_eq!(
        samples.len(),
        2 * 4 * 8,
        "two proxies x 4 steps x 8 responses"
    );
    let bon: Vec<_> = lines.iter().filter(|l| l["series"] == "bon p40").collect();
    assert_eq!(bon.len(), 3);
    // The analytic best-of-n KL: log n - (n - 1) / n (METHODS.md): n = 4 gives 0.636.
    assert!((bon[2]["kl/ref"].as_f64().unwrap() - (4f64.ln() - 0.75)).abs() < 1e-9);
}

/// Over seeds and reward-model sizes: a proxy, an RL run and a best-of-n curve per seed,
/// size and pairs count, named by all three; the tables over seeds; bad sizes refused
/// before any stage, naming the entry.
#[test]
fn tiny_overopt_over_seeds_and_sizes() {
    let root = scratch("overopt-seeds");
    let sets = [
        "overopt.seeds=2",
        "overopt.proxy_sizes=[{ layers = 1, d_model = 8 }, { layers = 2, d_model = 16 }]",
    ];
    let (dir, s) = run(tiny("overopt", &sets), &root);
    let rows = table(&s, "Overoptimisation");
    assert_eq!(rows.len(), 2 * 2 * 2, "seeds x sizes x pairs counts");
    // Run order: seed, then size, then pairs; the larger model has more parameters, the
    // same in both seeds.
    let col = |r: &Value, i: usize| r[i].as_u64().unwrap();
    let order: Vec<(u64, u64)> = rows.iter().map(|r| (col(r, 2), col(r, 0))).collect();
    assert_eq!(
        order,
        [
            (0, 20),
            (0, 40),
            (0, 20),
            (0, 40),
            (1, 20),
            (1, 40),
            (1, 20),
            (1, 40)
        ]
    );
    let (small, large) = (col(&rows[0], 1), col(&rows[2], 1));
    assert!(large > small, "{large} vs {small}");
    assert_eq!((col(&rows[4], 1), col(&rows[6], 1)), (small, large));
    let series: std::collections::BTreeSet<String> = metric_lines(&dir)
        .iter()
        .map(|l| l["series"].as_str().unwrap().to_string())
        .collect();
    for name in ["rl p20/l1d8/s0", "rl p40/l2d16/s1", "bon p20/l2d16/s1"] {
        assert!(series.contains(name), "{name} not in {series:?}");
    }
    let progress = std::fs::read_to_string(dir.join("checkpoints/progress.json")).unwrap();
    assert!(progress.contains("lm/proxy/p40/k1/l2d16/s1"));
    // Over seeds: a row per size and pairs count, each of 2 seeds.
    let over = table(&s, "Fits over seeds");
    assert_eq!(over.len(), 4);
    assert!(over.iter().all(|r| r[2] == 2));
    // Trends: for each of 4 coefficients and the gold peak, ln pairs at each size, then
    // ln RM params.
    let trends = table(&s, "Coefficient trends");
    assert_eq!(trends.len(), 5 * 3);
    assert_eq!(trends[12][0], "gold peak");
    assert_eq!(
        (trends[0][2].as_str(), trends[2][1].as_str()),
        (Some("l1d8"), Some("ln RM params"))
    );
    // Bad sizes are refused when the file is parsed.
    for (size, key) in [
        (
            "[{ layers = 1, d_model = 8 }, { layers = 1, d_model = 8 }]",
            "overopt.proxy_sizes[1]",
        ),
        (
            "[{ layers = 1, d_model = 8 }, { layers = 1, d_model = 9 }]",
            "overopt.proxy_sizes[1]",
        ),
        ("[{ layers = 0, d_model = 8 }]", "overopt.proxy_sizes[0]"),
    ] {
        let sets = [format!("overopt.proxy_sizes={size}")];
        let err = ExperimentConfig::parse(presets::preset("overopt").unwrap(), &sets)
            .expect_err(size)
            .to_string();
        assert!(err.contains(key), "{size}: {err}");
    }
    let sets = ["overopt.seeds=0".to_string()];
    let err = ExperimentConfig::parse(presets::preset("overopt").unwrap(), &sets).unwrap_err();
    assert!(err.to_string().contains("overopt.seeds"), "{err}");
}

#[test]
fn tiny_mitigations_preset() {
    let root = scratch("mitigations");
    let tb = root.join("tensorboard");
    let (dir, s) = run_with_tensorboard(tiny("mitigations", &[]), &root, Some(tb.clone()));
    let _ = assert_run_files(&dir, "mitigations");
    assert_tensorboard_reads_back(&dir, &tb);
    let rows = table(&s, "Mitigations");
    let methods: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        ["none", "kl", "ensemble-uwo", "par", "sequence-chi2"]
    );
    // The peak, by hand from metrics.jsonl: per seed the largest centred mean of 5 steps
    // of gold (truncated at the ends), then the mean over seeds.
    let lines = goodhart_metrics::sink::read_lines(dir.join("metrics.jsonl")).unwrap();
    let smoothed_peak = |series: &str| {
        let g: Vec<f64> = lines
            .iter()
            .filter(|l| l.labels.get("series").map(String::as_str) == Some(series))
            .filter_map(|l| l.metrics.get("reward/gold/mean").copied())
            .collect();
        assert!(g.len() > 2, "{series}: {} gold values", g.len());
        (0..g.len())
            .map(|i| {
                let (lo, hi) = (i.saturating_sub(2), (i + 3).min(g.len()));
                g[lo..hi].iter().sum::<f64>() / (hi - lo) as f64
            })
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let final_gold = |series: &str| {
        lines
            .iter()
            .rfind(|l| l.labels.get("series").map(String::as_str) == Some(series))
            .and_then(|l| l.metrics.get("reward/gold/mean").copied())
            .unwrap()
    };
    assert!(
        rows[0][6].is_null() && rows[0][7].is_null(),
        "the first arm is the reference"
    );
    for r in rows {
        assert_eq!(r[12], 2, "two seeds per arm");
        let arm = r[0].as_str().unwrap();
        if arm != "none" {
            assert_eq!(r[6], "none");
            // Final gold minus none's, paired by seed, then the mean.
            let want = (0..2)
                .map(|s| final_gold(&format!("{arm}/s{s}")) - final_gold(&format!("none/s{s}")))
                .sum::<f64>()
                / 2.0;
            let got = r[7].as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "{arm}: {got} vs {want}");
        }
        let want =
            (smoothed_peak(&format!("{arm}/s0")) + smoothed_peak(&format!("{arm}/s1"))) / 2.0;
        let peak = r[2].as_f64().unwrap();
        assert!(
            (peak - want).abs() < 1e-9,
            "{arm}: peak {peak}, by hand {want}"
        );
        assert!(
            r[3].as_f64().unwrap() >= 0.0,
            "spread is a standard deviation"
        );
    }
}

/// Ensembles as "Helping or Herding?" builds them: members fine-tuned from their own
/// pretrained trunks, or all from one; best-of-n once per distinct proxy.
#[test]
fn tiny_mitigations_ensembles_and_best_of_n() {
    let root = scratch("mitigations-ensembles");
    let arms = "mitigations.arms=[\
        { name = \"none\" },\
        { name = \"kl\", rl = { regularizers = [{ kind = \"kl\", controller = { kind = \"fixed\", coef = 0.05 } }] } },\
        { name = \"pre\", ensemble = 2, ensemble_kind = \"pretrain\" },\
        { name = \"ft\", ensemble = 2, ensemble_kind = \"finetune\", aggregation = { kind = \"worst_case\" }, compare_to = \"pre\" }]";
    let bon = "mitigations.best_of_n={ ns = [1, 2, 4], samples_per_prompt = 4, prompts = 2 }";
    let (dir, s) = run(tiny("mitigations", &[arms, bon]), &root);
    let progress = std::fs::read_to_string(dir.join("checkpoints/progress.json")).unwrap();
    for stage in [
        "lm/rm-pretrain/t0/s0",
        "lm/rm-pretrain/t1/s1",
        "lm/proxy/p20/k2/pretrain/s0",
        "lm/proxy/p20/k2/finetune/s1",
        "mitigations/bon/none/s1",
        "mitigations/bon/pre/s0",
    ] {
        assert!(progress.contains(&format!("\"{stage}\"")), "{stage}");
    }
    // The finetune ensemble shares trunk t0 with the pretrain one: no t2; kl shares
    // none's proxy, so no best-of-n of its own.
    assert!(!progress.contains("lm/rm-pretrain/t2"));
    assert!(!progress.contains("mitigations/bon/kl"));
    let bon_rows = table(&s, "Best-of-n against each proxy");
    let arms: Vec<&str> = bon_rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(arms, ["none, kl", "pre", "ft"]);
    assert_eq!(
        (
            bon_rows[1][2].as_str(),
            bon_rows[2][2].as_str(),
            bon_rows[2][3].as_str()
        ),
        (Some("pretrain"), Some("finetune"), Some("worst_case"))
    );
    // Gold at the largest n, by hand from metrics.jsonl: the mean over seeds of the n = 4
    // line of each seed's curve.
    let lines = metric_lines(&dir);
    let at4 = |series: &str| {
        lines
            .iter()
            .find(|l| l["series"] == series && l["n"] == 4.0)
            .unwrap()["reward/gold/mean"]
            .as_f64()
            .unwrap()
    };
    let want = (at4("bon pre/s0") + at4("bon pre/s1")) / 2.0;
    assert!((bon_rows[1][5].as_f64().unwrap() - want).abs() < 1e-9);
    let diff =
        (at4("bon pre/s0") - at4("bon none/s0") + at4("bon pre/s1") - at4("bon none/s1")) / 2.0;
    assert_eq!(bon_rows[1][7], "none");
    assert!((bon_rows[1][8].as_f64().unwrap() - diff).abs() < 1e-9);
    // `ft` is compared with `pre`, in both tables.
    assert_eq!(bon_rows[2][7], "pre");
    let diff = (at4("bon ft/s0") - at4("bon pre/s0") + at4("bon ft/s1") - at4("bon pre/s1")) / 2.0;
    assert!((bon_rows[2][8].as_f64().unwrap() - diff).abs() < 1e-9);
    let rl_rows = table(&s, "Mitigations");
    assert_eq!(
        (rl_rows[1][6].as_str(), rl_rows[3][6].as_str()),
        (Some("none"), Some("pre"))
    );
    // An unknown kind is refused when the file is parsed, naming the key.
    let sets = ["mitigations.arms=[{ name = \"x\", ensemble_kind = \"pretrained\" }]".to_string()];
    let err = ExperimentConfig::parse(presets::preset("mitigations").unwrap(), &sets).unwrap_err();
    assert!(err.to_string().contains("ensemble_kind"), "{err}");
    let sets =
        ["mitigations.arms=[{ name = \"x\" }, { name = \"y\", compare_to = \"z\" }]".to_string()];
    let err = ExperimentConfig::parse(presets::preset("mitigations").unwrap(), &sets).unwrap_err();
    assert!(
        err.to_string().contains("mitigations.arms[1].compare_to"),
        "{err}"
    );
}

/// The default preset's report, driven in Chromium: the smoothing slider re-smooths every
/// step chart with `report::ema`'s average, a click on a legend entry hides its line (a
/// second shows it), and a zoom on one step chart zooms them all (a double-click resets).
#[test]
fn tiny_lab_preset_report_is_driven_in_a_browser() {
    let root = scratch("lab");
    let (dir, _) = run(tiny("lab", &[]), &root);
    let Some(b) = assert_run_files(&dir, "lab") else {
        return;
    };
    let charts = b.eval(
        "const input = document.getElementById('smoothing');
         input.value = String(arguments[0]);
         input.dispatchEvent(new Event('input', {bubbles: true}));
         return window.goodhartReport.charts.filter(c => c.spec.step).map(c => ({
             id: c.id, x: c.plot.data[0], ys: c.plot.data.slice(1),
             lines: c.spec.lines.map(l => ({x: l.x, y: l.y}))}));",
        json!([0.9]),
    );
    let charts = charts.as_array().unwrap();
    // The three experiments' reward charts and the small multiples.
    assert!(charts.len() > 3, "{} step charts", charts.len());
    let mut checked = 0;
    for c in charts {
        let xs: Vec<f64> = serde_json::from_value(c["x"].clone()).unwrap();
        for (k, line) in c["lines"].as_array().unwrap().iter().enumerate() {
            let x: Vec<f64> = serde_json::from_value(line["x"].clone()).unwrap();
            let y: Vec<f64> = serde_json::from_value(line["y"].clone()).unwrap();
            let want = goodhart_train::report::ema(&y, 0.9);
            for (xi, w) in x.iter().zip(&want) {
                let at = xs.iter().position(|v| v == xi).unwrap();
                let got = c["ys"][k][at].as_f64().unwrap();
                assert!(
                    (got - w).abs() <= 1e-9 * w.abs().max(1.0),
                    "{}: line {k} at x = {xi}: drawn {got}, EMA {w}",
                    c["id"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{checked} smoothed points checked");
    assert_eq!(
        b.eval(
            "return document.getElementById('smoothing-value').textContent;",
            json!([])
        ),
        "0.90"
    );

    // A click on the first line's legend entry hides it; a second click shows it again.
    let state = "const c = window.goodhartReport.charts.find(c => c.id === 'rewards-0');
                 const row = document.querySelector('[data-chart=\"rewards-0\"] .u-legend .u-series:nth-child(2)');
                 return [c.plot.series[1].show, row.classList.contains('u-off')];";
    assert_eq!(b.eval(state, json!([])), json!([true, false]));
    let entry = "[data-chart=\"rewards-0\"] .u-legend .u-series:nth-child(2)";
    b.click(entry);
    assert_eq!(b.eval(state, json!([])), json!([false, true]));
    b.click(entry);
    assert_eq!(b.eval(state, json!([])), json!([true, false]));

    // Selecting steps on one chart zooms every step chart to them. uPlot applies scales
    // in a microtask, so each state is read by the next call.
    let scales = "return window.goodhartReport.charts.filter(c => c.spec.step)
                  .map(c => [c.plot.scales.x.min, c.plot.scales.x.max]);";
    let want = b.eval(
        "const u = window.goodhartReport.charts.filter(c => c.spec.step)[0].plot;
         const want = [u.posToVal(40, 'x'), u.posToVal(140, 'x')];
         u.setSelect({left: 40, top: 0, width: 100, height: 10}, true);
         return want;",
        json!([]),
    );
    let want: [f64; 2] = serde_json::from_value(want).unwrap();
    assert!(want[1] > want[0]);
    let got: Vec<[f64; 2]> = serde_json::from_value(b.eval(scales, json!([]))).unwrap();
    for g in &got {
        assert!(
            (g[0] - want[0]).abs() < 1e-9 && (g[1] - want[1]).abs() < 1e-9,
            "{g:?} vs {want:?}"
        );
    }
    // A double-click on any step chart resets them all to their data.
    b.eval(
        "window.goodhartReport.charts.filter(c => c.spec.step)[1].plot.over
             .dispatchEvent(new MouseEvent('dblclick', {bubbles: true}));",
        json!([]),
    );
    let reset: Vec<[f64; 2]> = serde_json::from_value(b.eval(scales, json!([]))).unwrap();
    let full: Vec<[f64; 2]> = serde_json::from_value(b.eval(
        "return window.goodhartReport.charts.filter(c => c.spec.step)
             .map(c => [c.plot.data[0][0], c.plot.data[0][c.plot.data[0].length - 1]]);",
        json!([]),
    ))
    .unwrap();
    for (r, f) in reset.iter().zip(&full) {
        assert!(
            r[0] <= f[0] && r[1] >= f[1],
            "reset {r:?} does not cover the data {f:?}"
        );
    }
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    drop(b);
}

/// The browser check fails where it should: a report whose script throws (a chart
/// without its data) is a console error, and a chart container left empty is named.
#[test]
fn the_browser_check_fails_on_a_script_error_or_an_undrawn_chart() {
    use goodhart_train::report::{render, Metrics};
    let root = scratch("browser-fails");
    std::fs::create_dir_all(&root).unwrap();
    let metrics = Metrics::parse(
        "{\"step\":0,\"reward/proxy/mean\":0.1,\"reward/gold/mean\":0.2,\"entropy\":1}\n\
         {\"step\":1,\"reward/proxy/mean\":0.3,\"reward/gold/mean\":0.1,\"entropy\":0.9}\n",
        Path::new("metrics.jsonl"),
    )
    .unwrap();
    let html = render("broken", &metrics, None, &[]);
    let check = |tag: &str, page: String| -> String {
        let dir = root.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("report.html"), page).unwrap();
        let err = std::panic::catch_unwind(|| browser::check_report(&dir, "broken").is_some())
            .expect_err("the check should fail");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    if browser::Browser::start().is_none() {
        return;
    }
    // The intact page passes.
    let dir = root.join("intact");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("report.html"), &html).unwrap();
    assert!(browser::check_report(&dir, "broken").is_some());
    // A container whose chart has no data: the script throws.
    let thrown = check(
        "thrown",
        html.replacen(r#"data-chart="metric-0""#, r#"data-chart="missing""#, 1),
    );
    assert!(thrown.contains("no data for chart missing"), "{thrown}");
    // An extra container the script never sees (outside the data's ids, after it ran).
    let undrawn = check(
        "undrawn",
        html.replacen(
            "</body>",
            r#"<script>document.body.insertAdjacentHTML('beforeend', '<div data-chart="extra"></div>');</script></body>"#,
            1,
        ),
    );
    assert!(undrawn.contains("charts not drawn"), "{undrawn}");
}

/// The multi-turn lab, tiny: every arm trains 4 steps from one base policy and is
/// evaluated at steps 0, 2 and 4 on the same fresh episodes at step 0; every sample's
/// gold is its episode's outcome (0 or 1) and the dense arm's proxy adds the step rewards.
#[test]
fn tiny_multiturn_preset() {
    let config = tiny(
        "multiturn",
        &[
            "multiturn.seeds=1",
            "multiturn.eval_every=2",
            "multiturn.eval_episodes=1",
        ],
    );
    let root = scratch("multiturn");
    let (dir, summary) = run(config, &root);
    let _ = assert_run_files(&dir, "multiturn");
    let arms = ["outcome", "dense", "gra", "igpo", "a2tgpo"];
    let rows = table(&summary, "Multi-turn");
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(names, arms);
    assert_eq!(summary["charts"].as_array().unwrap().len(), 3);
    let lines = metric_lines(&dir);
    let mut first_eval = Vec::new();
    for arm in arms {
        let train = lines
            .iter()
            .filter(|l| l["series"] == format!("{arm}/s0"))
            .count();
        assert_eq!(train, 4, "{arm}");
        let eval: Vec<_> = lines
            .iter()
            .filter(|l| l["series"] == format!("{arm}/s0/eval"))
            .collect();
        let steps: Vec<u64> = eval.iter().map(|l| l["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [0, 2, 4], "{arm}");
        first_eval.push(eval[0]["eval/outcome"].as_f64().unwrap());
    }
    assert!(
        first_eval.windows(2).all(|w| w[0] == w[1]),
        "every arm's step-0 evaluation plays the same episodes: {first_eval:?}"
    );
    for sample in jsonl(&dir, "samples.jsonl") {
        let (proxy, gold) = (
            sample["rewards"]["proxy"].as_f64().unwrap(),
            sample["rewards"]["gold"].as_f64().unwrap(),
        );
        assert!(gold == 0.0 || gold == 1.0, "{sample:?}");
        if sample["series"] == "dense/s0" {
            assert!(proxy >= gold - 1e-6, "{sample:?}");
        } else {
            assert!((proxy - gold).abs() < 1e-6, "{sample:?}");
        }
    }
}

#[test]
fn tiny_rubric_preset() {
    let config = tiny(
        "rubric",
        &[
            "rl.max_new_tokens=7",
            "rubric.seeds=1",
            "rubric.eval_every=2",
            "rubric.eval_samples=4",
            "rubric.gap_samples=2",
            "rubric.verifiers=[{name = \"weak\"}, {name = \"strong\", rates = {missing_conjunct = 0.1, incomplete_enumeration = 0.1, inferred_content = 0.1, concept_substitution = 0.1, topical_alignment = 0.1}}]",
        ],
    );
    let root = scratch("rubric-a");
    let (dir, summary) = run(config.clone(), &root);
    let _ = assert_run_files(&dir, "rubric");
    for title in [
        "Rubric lab: verifier",
        "Rubric lab: exploitation",
        "Rubric lab: exploited weight",
        "Rubric lab: self-internalisation",
    ] {
        let rows = table(&summary, title);
        let names: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
        assert_eq!(names, ["weak", "strong"], "{title}");
    }
    // Two charts per verifier.
    assert_eq!(summary["charts"].as_array().unwrap().len(), 4);
    let lines = metric_lines(&dir);
    for verifier in ["weak", "strong"] {
        // The trainer's 4 steps; the evaluations at steps 0, 2 and 4.
        let train: Vec<_> = lines
            .iter()
            .filter(|l| l["series"] == format!("{verifier}/s0"))
            .collect();
        assert_eq!(train.len(), 4);
        let eval: Vec<_> = lines
            .iter()
            .filter(|l| l["series"] == format!("{verifier}/s0/eval"))
            .collect();
        let steps: Vec<u64> = eval.iter().map(|l| l["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [0, 2, 4]);
        // A verifier credits every criterion that holds: its reward is never below
        // the reference's, on the evaluations and on every training batch.
        for l in &eval {
            let (p, r) = (
                l["eval/proxy"].as_f64().unwrap(),
                l["eval/reference"].as_f64().unwrap(),
            );
            assert!(
                p >= r && (0.0..=1.0).contains(&p) && (0.0..=1.0).contains(&r),
                "{l:?}"
            );
            assert!(l["eval/gap"].as_f64().unwrap().is_finite());
            let fc = l["eval/false_credit"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&fc));
        }
        assert!(eval[1..]
            .iter()
            .any(|l| l.contains_key("eval/exploitation")));
        for l in &train {
            let (p, g) = (
                l["reward/proxy/mean"].as_f64().unwrap(),
                l["reward/gold/mean"].as_f64().unwrap(),
            );
            assert!(p >= g - 1e-6, "{l:?}");
        }
    }
    // Both verifiers train from the one base policy and evaluate on one sampling stream:
    // the same reference reward and gap at step 0.
    let at0 = |v: &str, k: &str| {
        lines
            .iter()
            .find(|l| l["series"] == format!("{v}/s0/eval") && l["step"] == 0)
            .unwrap()[k]
            .clone()
    };
    for k in ["eval/gap", "eval/reference", "eval/reference_with_rubric"] {
        assert_eq!(at0("weak", k), at0("strong", k), "{k}");
    }
    // Same seed, same numbers.
    let again = scratch("rubric-b");
    let (b, _) = run(config, &again);
    assert_eq!(
        std::fs::read(dir.join("metrics.jsonl")).unwrap(),
        std::fs::read(b.join("metrics.jsonl")).unwrap()
    );
}

const CHILD_ENV: &str = "GOODHART_LAB_CHILD_ROOT";

fn resume_config() -> ExperimentConfig {
    tiny(
        "lab",
        &[
            "tomato.seeds=1",
            "tomato.base={iterations = 6, envs = 4}",
            "tomato.ppo={iterations = 6, envs = 4}",
            // tiny_tomato_preset covers the default fresh start; this run the other one.
            "tomato.proxy_init=\"base\"",
            "mitigations.seeds=1",
            "mitigations.arms=[{name = \"none\"}, {name = \"kl\", rl = {regularizers = [{kind = \"kl\", controller = {kind = \"fixed\", coef = 0.1}}]}}]",
            // The DAA lab's stages are killed and resumed with the rest.
            "daa={seeds = 1, pairs = 128, betas = [0.1, 1.0], methods = [{name = \"dpo\", loss = {kind = \"dpo\"}}], train = {epochs = 2, batch_size = 16}, eval_every = 2, eval_samples = 32}",
            "seed=7",
        ],
    )
}

/// The child process of `two_processes_and_four_kills_write_the_same_bytes`.
#[test]
#[ignore = "run by two_processes_and_four_kills_write_the_same_bytes in a child process"]
fn resume_child() {
    let root = PathBuf::from(std::env::var(CHILD_ENV).expect("run by the resume test"));
    run(resume_config(), &root);
}

/// Starts `resume_child` in a new process, writing under `root`.
fn child(root: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "resume_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, root)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The run directory of `resume_config` under `root`.
fn run_dir(root: &Path) -> PathBuf {
    root.join("lab").join("s7")
}

fn stages_done(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("checkpoints").join("progress.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map_or(0, |v| v["stages"].as_array().unwrap().len())
}

fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
        }
    }
}

/// Asserts that two run directories hold the same files with the same bytes, except each
/// stage's wall time in `progress.json`.
fn assert_same_bytes(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (Vec::new(), Vec::new());
    files(a, a, &mut fa);
    files(b, b, &mut fb);
    fa.sort();
    fb.sort();
    assert_eq!(fa, fb, "the same files");
    for f in &fa {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        if f.ends_with("progress.json") {
            let strip = |bytes: &[u8]| {
                let mut v: Value = serde_json::from_slice(bytes).unwrap();
                for s in v["stages"].as_array_mut().unwrap() {
                    s.as_object_mut().unwrap().remove("seconds");
                }
                v
            };
            assert_eq!(strip(&x), strip(&y), "{}", f.display());
        } else {
            assert!(x == y, "{} differs", f.display());
        }
    }
}

/// Same config, same seed: two processes write the same bytes (metrics, samples,
/// checkpoints, summary, report), and a run killed with SIGKILL at four points (the last
/// in a DAA stage), then resumed, writes the bytes of the uninterrupted one.
#[test]
fn two_processes_and_four_kills_write_the_same_bytes() {
    let root = scratch("bytes");
    let (ra, rb) = (root.join("a"), root.join("b"));
    let (mut a, mut b) = (child(&ra), child(&rb));
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let reference = run_dir(&ra);
    assert_same_bytes(&reference, &run_dir(&rb));
    let total = stages_done(&reference);
    assert!(total >= 9, "{total} stages");
    // The last kill lands in the last stage, a DAA run.
    for (i, kill_at) in [0, total / 3, 2 * total / 3, total - 1]
        .into_iter()
        .enumerate()
    {
        let killed_root = root.join(format!("killed{i}"));
        let dir = run_dir(&killed_root);
        let mut c = child(&killed_root);
        let t0 = Instant::now();
        // Killed while stage `kill_at` runs (its lines partly written).
        let progress = dir.join("checkpoints").join("progress.json");
        while stages_done(&dir) < kill_at || !progress.exists() {
            assert!(c.try_wait().unwrap().is_none(), "finished before the kill");
            assert!(t0.elapsed() < Duration::from_secs(300), "no progress");
            std::thread::sleep(Duration::from_millis(2));
        }
        c.kill().unwrap(); // SIGKILL on unix
        c.wait().unwrap();
        let done = stages_done(&dir);
        assert!(done < total, "killed after every stage had finished");
        let records = |dir: &Path| -> Vec<Value> {
            let text = std::fs::read_to_string(dir.join("checkpoints/progress.json")).unwrap();
            serde_json::from_str::<Value>(&text).unwrap()["stages"]
                .as_array()
                .unwrap()
                .clone()
        };
        let before = records(&dir);
        let mut resumed = Runner::resume(&dir).unwrap().quiet(true);
        experiments::run::<B>(&mut resumed, &goodhart_core::device::cpu()).unwrap();
        assert_eq!(resumed.repaired(), 0);
        drop(resumed);
        // Completed stages are not rerun: their records, wall time included, are kept.
        assert_eq!(records(&dir)[..done], before[..]);
        assert_same_bytes(&reference, &dir);
    }
}

/// `[rl]` settings that, together, use every method name `cargo xtask list` gives for
/// `[rl]` (all but the four estimators and the loss that need turns), each with the
/// ensemble size it needs.
fn every_rl_method() -> Vec<(String, usize)> {
    let mut cases: Vec<(String, usize)> = Vec::new();
    let mut add = |toml: &str, k: usize| cases.push((toml.to_string(), k));
    for a in goodhart_advantage::REGISTRY.iter().map(|m| m.name) {
        match a {
            "gra" | "a2tgpo" | "igpo" | "verpo" => continue, // refused: see below
            "gdpo" => add("advantage = { kind = \"gdpo\" }\ncomponents = [{ name = \"proxy\" }, { name = \"length\", weight = -0.1 }]", 1),
            "bnpo" => add("advantage = { kind = \"bnpo\" }\nreward_shaping = { kind = \"par\", m = 2 }", 1),
            a => add(&format!("advantage = {{ kind = \"{a}\" }}"), 1),
        }
    }
    for l in goodhart_objective::policy::REGISTRY.iter().map(|m| m.name) {
        if l != "a2tgpo_clip" {
            // a2tgpo_clip needs turns: the multiturn lab's test runs it.
            add(&format!("loss = {{ kind = \"{l}\" }}"), 1);
        }
    }
    add("loss = { kind = \"ppo_clip\", eps_low = 0.2, eps_high = 0.28, dual_clip = true, clip_ratio_c = 2.0 }", 1);
    for (a, _) in goodhart_core::aggregate::LossAggregation::ALL {
        add(&format!("aggregation = \"{a}\""), 1);
    }
    add(
        "aggregation = \"seq-mean-token-mean\"\nsample_filter = \"nsr\"\nempty_rows = \"skip\"",
        1,
    );
    add(
        "aggregation = \"seq-mean-token-sum-norm\"\nloss_scale_factor = 24.0",
        1,
    );
    add("rollout_is = {}", 1);
    add("rollout_is = { level = \"sequence\", threshold = 2.0, lower = 0.5, batch_normalize = true }\nloss = { kind = \"clip_cov\", ratio = 0.05 }", 1);
    for f in goodhart_objective::nsr::REGISTRY.iter().map(|m| m.name) {
        add(&format!("sample_filter = \"{f}\""), 1);
    }
    for (e, _) in goodhart_regularize::kl::KlEstimator::ALL {
        for place in ["reward", "loss"] {
            add(&format!("regularizers = [{{ kind = \"kl\", estimator = \"{e}\", placement = \"{place}\" }}]"), 1);
        }
    }
    for c in [
        "{ kind = \"fixed\", coef = 0.1 }",
        "{ kind = \"adaptive\" }",
        "{ kind = \"reward_adaptive\", beta_min = 0.01, beta_max = 0.1, reward_start = 0.0, reward_target = 1.0 }",
        "{ kind = \"lagrangian\" }",
    ] {
        add(&format!("regularizers = [{{ kind = \"kl\", placement = \"reward\", controller = {c} }}]"), 1);
    }
    for r in [
        "{ kind = \"entropy\", coef = 0.01 }",
        "{ kind = \"entropy\", coef = 0.01, top_q = 0.2 }",
        "{ kind = \"sequence_chi2\", coef = 0.1 }",
        "{ kind = \"sft_anchor\", coef = 0.1 }",
        "{ kind = \"lp_reg\" }",
    ] {
        add(&format!("regularizers = [{r}]"), 1);
    }
    add("regularizers = [{ kind = \"gardo\", coef = 1.0 }]\ncomponents = [{ name = \"proxy\" }, { name = \"length\", weight = 0.0 }]", 1);
    add("regularizers = [{ kind = \"constrained\", constraints = [{ threshold = 0.0 }, { threshold = 3.0, kind = \"equality\" }] }, { kind = \"kl\", placement = \"reward\", controller = { kind = \"fixed\", coef = 0.1 } }]\ncomponents = [{ name = \"proxy\" }, { name = \"length\", weight = 0.0 }]", 1);
    for s in ["par", "centred", "lsc"] {
        add(&format!("reward_shaping = {{ kind = \"{s}\", m = 2 }}"), 1);
    }
    add(
        "reward_shaping = { kind = \"tanh\", centred = true, m = 2 }",
        1,
    );
    for s in ["meanstd", "clip", "minmax", "tanh"] {
        add(&format!("reward_shaping = {{ kind = \"{s}\" }}"), 1);
    }
    add("reward_shaping = { kind = \"ceil\", value = 0.5 }", 1);
    add(
        "length_penalty = { kind = \"linear_length\", coef = 0.05 }",
        1,
    );
    add(
        "length_penalty = { kind = \"dapo_overlong\", max_len = 12, buffer = 4 }",
        1,
    );
    add("length_penalty = { kind = \"fimi\", steps = 20 }", 1);
    add("ctrl_u = { beta = 1.0 }", 3);
    add(
        "components = [{ name = \"member0\" }, { name = \"member2\", weight = 0.5 }]",
        3,
    );
    add("dynamic_sampling = { max_batches = 3 }", 1);
    add("overlong_filter = true", 1);
    cases
}

/// Every `[rl]` method name runs 3 steps from a TOML file, as the arms of one tiny
/// mitigations run on the overoptimisation task, with finite metrics in `metrics.jsonl`
/// and 8 samples a step in `samples.jsonl`.
#[test]
fn every_rl_method_runs_from_toml() {
    let cases = every_rl_method();
    let mut text = String::from(
        "name = \"every-method\"\n\
         [sft]\nexamples = 64\nheldout = 16\nsteps = 4\nbatch = 8\n\
         [proxy]\nepochs = 1\nheldout_pairs = 16\npearson_samples = 16\n\
         [rl]\nsteps = 3\nprompts_per_step = 2\ngroup_size = 4\nmax_new_tokens = 12\n\
         [mitigations]\nseeds = 1\npairs = 20\n",
    );
    for (i, (rl, k)) in cases.iter().enumerate() {
        text.push_str(&format!(
            "[[mitigations.arms]]\nname = \"m{i}\"\nensemble = {k}\n[mitigations.arms.rl]\n{rl}\n"
        ));
    }
    let config = ExperimentConfig::parse(&text, &[]).unwrap_or_else(|e| panic!("{e}"));
    let root = scratch("every-method");
    let (dir, _) = run(config, &root);
    let lines = goodhart_metrics::sink::read_lines(dir.join("metrics.jsonl")).unwrap();
    let samples = jsonl(&dir, "samples.jsonl");
    let mut failures = Vec::new();
    for (i, (rl, _)) in cases.iter().enumerate() {
        let series = format!("m{i}/s0");
        let mine: Vec<_> = lines
            .iter()
            .filter(|l| l.labels.get("series") == Some(&series))
            .collect();
        if mine.len() != 3 {
            failures.push(format!("{rl}: {} lines", mine.len()));
        }
        for l in &mine {
            for key in [
                "loss",
                "reward/proxy/mean",
                "reward/gold/mean",
                "kl/ref",
                "entropy",
                "length/mean",
                "advantage/mean",
            ] {
                if !l.get(key).is_finite() {
                    failures.push(format!("{rl}: {key} = {} at step {}", l.get(key), l.step));
                }
            }
        }
        let n = samples
            .iter()
            .filter(|s| s["series"] == series.as_str())
            .count();
        if n != 3 * 8 {
            failures.push(format!("{rl}: {n} samples"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The estimators that need turns or unit tests are refused when the file is parsed,
/// naming the key, so no stage runs.
#[test]
fn turn_and_test_estimators_are_refused_before_any_stage() {
    for name in ["gra", "a2tgpo", "igpo", "verpo"] {
        let sets = [format!("rl.advantage={{ kind = \"{name}\" }}")];
        let err = ExperimentConfig::parse(presets::preset("overopt").unwrap(), &sets)
            .expect_err(name)
            .to_string();
        assert!(err.contains("rl.advantage.kind"), "{name}: {err}");
    }
}

/// The `grpo-hf` preset with its paths under the repository, shrunk by `sets`.
fn grpo_hf(sets: &[&str]) -> ExperimentConfig {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    ExperimentConfig::parse_at(presets::preset("grpo-hf").unwrap(), &sets, &root)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn grpo_on_a_hf_model_and_jsonl_prompts_writes_a_model_directory() {
    use goodhart_policy::hf;
    let config = grpo_hf(&["rl.steps=3"]);
    let (root_a, root_b) = (scratch("grpo-hf-a"), scratch("grpo-hf-b"));
    let (a, summary) = run(config.clone(), &root_a);
    let (b, _) = run(config.clone(), &root_b);
    let _ = assert_run_files(&a, "grpo-hf");
    // Same seed, same numbers, same weights.
    for f in ["metrics.jsonl", "samples.jsonl"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    let saved = a.join("checkpoints/train/s0/policy");
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(
        weights(&saved),
        weights(&b.join("checkpoints/train/s0/policy"))
    );
    assert_eq!(
        summary["train"]["policies"][0],
        "checkpoints/train/s0/policy"
    );
    // A model directory goodhart (and transformers: the fixture script's --check) loads,
    // with the tokenizer files beside it, and weights that training moved.
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(saved.join(f).is_file(), "{f}");
    }
    let device = goodhart_core::device::cpu();
    let fixture = config.policy.as_ref().unwrap().path.clone();
    let (trained, _) = hf::load::<goodhart_core::device::Dispatch>(&saved, &device).unwrap();
    let (initial, _) = hf::load::<goodhart_core::device::Dispatch>(&fixture, &device).unwrap();
    let w = |m: &goodhart_policy::TransformerLm<goodhart_core::device::Dispatch>| {
        m.trunk
            .tok_emb
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap()
    };
    let moved = w(&trained)
        .iter()
        .zip(w(&initial))
        .filter(|(x, y)| x != &y)
        .count();
    assert!(moved > 0, "the embedding did not change");
    // Every sample's rewards are the sources on its decoded text: the proxy 0.5 (writes a
    // digit) + the reward model's score of prompt + response, the gold math_verify
    // against its prompt's answer.
    let rows = config.data.as_ref().unwrap().read_prompts().unwrap();
    let rm = goodhart_reward::hf_reward::HfRewardModel::<goodhart_core::device::Dispatch>::load(
        "rm",
        &goodhart_reward::hf_reward::HfRewardModelConfig {
            path: fixture.parent().unwrap().join("qwen2-rm"),
            batch_size: 4,
        },
        &device,
    )
    .unwrap();
    let samples = jsonl(&a, "samples.jsonl");
    assert_eq!(samples.len(), 3 * 4 * 4);
    let mut digits = 0;
    for s in &samples {
        let text = s["text"].as_str().unwrap();
        let rewards = &s["rewards"];
        let row = &rows[s["prompt"].as_u64().unwrap() as usize];
        let goodhart_train::data::Text::Plain(prompt) = &row.prompt else {
            panic!("plain prompts")
        };
        let digit = text.chars().any(|c| c.is_ascii_digit());
        digits += digit as usize;
        let ids = rm
            .tokenizer()
            .encode_with_special_tokens(&format!("{prompt}{text}"))
            .unwrap();
        let want = 0.5 * digit as u8 as f64 + rm.score_ids(&[ids], &device).unwrap()[0] as f64;
        let got = rewards["proxy"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "{text:?}: {got} vs {want}");
        // Each component logged on its own.
        assert_eq!(rewards["proxy/format"], if digit { 1.0 } else { 0.0 });
        let rm_score = rewards["proxy/rm"].as_f64().unwrap();
        assert!((0.5 * digit as u8 as f64 + rm_score - got).abs() < 1e-5);
        let answer = row.answer.as_deref().unwrap();
        let v = goodhart_reward::math_verify::verify(text, answer, &Default::default());
        assert_eq!(
            rewards["gold"],
            if v.correct { 1.0 } else { 0.0 },
            "{text:?}"
        );
    }
    assert!(
        digits > 0 && digits < samples.len(),
        "both kinds of response: {digits}"
    );
    let steps = metric_lines(&a);
    assert_eq!(steps.len(), 3);
    for m in &steps {
        let part = |k: &str| m[&format!("reward/proxy/{k}/mean")].as_f64().unwrap();
        let total = m["reward/proxy/mean"].as_f64().unwrap();
        assert!(
            (0.5 * part("format") + part("rm") - total).abs() < 1e-5,
            "{m:?}"
        );
    }
    assert!(steps
        .iter()
        .all(|m| m["reward/proxy/mean"].as_f64().unwrap() >= 0.0));
}

#[test]
fn a_run_on_a_model_directory_rejects_bad_sections_before_any_work() {
    let err = |sets: &[&str]| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        ExperimentConfig::parse_at(presets::preset("grpo-hf").unwrap(), &sets, &root)
            .unwrap_err()
            .to_string()
    };
    // Sections that go together, and only with [train].
    let text = presets::preset("grpo-hf")
        .unwrap()
        .replace("[data]", "[unused]");
    let e = ExperimentConfig::parse(&text, &[]).unwrap_err().to_string();
    assert!(e.contains("unused"), "{e}");
    let no_data: String = {
        let mut t: toml::Table = presets::preset("grpo-hf").unwrap().parse().unwrap();
        t.remove("data");
        toml::to_string(&t).unwrap()
    };
    let e = ExperimentConfig::parse(&no_data, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing [data]"), "{e}");
    let no_train: String = {
        let mut t: toml::Table = presets::preset("grpo-hf").unwrap().parse().unwrap();
        t.remove("train");
        t.insert("tomato".into(), toml::Value::Table(Default::default()));
        toml::to_string(&t).unwrap()
    };
    let e = ExperimentConfig::parse(&no_train, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("read only by [train] and [daa]"), "{e}");
    // Each key named with what is wrong.
    for (set, want) in [
        ("policy.path=\"nowhere\"", "`policy.path`"),
        (
            "policy.reference=\"crates/goodhart-policy/fixtures/hf/llama\"",
            "`policy.reference`",
        ),
        ("data.columns.answer=\"nope\"", "`data`"),
        (
            "data.columns={prompt = \"question\"}",
            "`data.columns.answer`",
        ),
        (
            "rewards.proxy={kind = \"format\", pattern = \"(\"}",
            "`rewards.proxy.pattern`",
        ),
        (
            "rewards.gold={kind = \"math_verify\", tolerance = -1.0}",
            "`rewards.gold.tolerance`",
        ),
        (
            "rewards.gold={kind = \"judge\"}",
            "`rewards.gold.kind`: unknown variant `judge`",
        ),
        (
            "rewards.proxy={kind = \"weighted_sum\", components = [{name = \"rm\", reward = \
             {kind = \"hf_reward_model\", path = \"crates/goodhart-policy/fixtures/hf/qwen2\"}}]}",
            "`rewards.proxy.components[0].reward.path`: a causal LM",
        ),
        (
            "rewards.proxy={kind = \"weighted_sum\", components = [{name = \"a\", reward = \
             {kind = \"format\", pattern = \"x\"}}, {name = \"a\", reward = {kind = \"format\", \
             pattern = \"y\"}}]}",
            "`rewards.proxy.components[1].name`",
        ),
        ("rl.max_new_tokens=64", "`rl.max_new_tokens`"),
        (
            "rl.regularizers=[{kind = \"sft_anchor\", coef = 0.1}]",
            "`rl.regularizers`",
        ),
    ] {
        let e = err(&[set]);
        assert!(e.contains(want), "{set}: {e}");
    }
}

#[test]
fn tiny_daa_preset() {
    let config = tiny(
        "daa",
        &[
            "daa.seeds=1",
            "daa.pairs=64",
            "daa.betas=[0.1, 1.0]",
            "daa.methods=[{name = \"dpo\", loss = {kind = \"dpo\"}}, {name = \"slic\", loss = {kind = \"slic\"}}]",
            "daa.train={epochs = 2, batch_size = 16, lr = 1e-3}",
            "daa.eval_every=2",
            "daa.eval_samples=16",
        ],
    );
    // What each method and run sets is refused under `train`, not ignored.
    let text = presets::preset("daa").unwrap();
    let err = ExperimentConfig::parse(text, &["daa.train.loss={kind = \"ipo\"}".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("daa.train.loss"), "{err}");
    let (root_a, root_b) = (scratch("daa-a"), scratch("daa-b"));
    let (dir, summary) = run(config.clone(), &root_a);
    let _ = assert_run_files(&dir, "daa");
    // DPO at each beta, SLiC once (it has no beta).
    let rows = table(&summary, "DAA");
    let names: Vec<(&str, Option<f64>)> = rows
        .iter()
        .map(|r| (r[0].as_str().unwrap(), r[1].as_f64()))
        .collect();
    assert_eq!(
        names,
        [("dpo", Some(0.1)), ("dpo", Some(1.0)), ("slic", None)]
    );
    // One seed's runs start from the same base policy and evaluation samples.
    assert!(rows.iter().all(|r| r[2] == rows[0][2]), "{rows:?}");
    for r in rows {
        let (peak, fin) = (r[3].as_f64().unwrap(), r[6].as_f64().unwrap());
        assert!(peak >= fin && peak >= r[2].as_f64().unwrap(), "{r:?}");
        assert_eq!(r[10], 1, "seeds");
        // 4 steps an epoch: the peak at one of the evaluated steps 0, 2, ..., 8.
        let at = r[5].as_f64().unwrap();
        assert!([0.0, 0.5, 1.0, 1.5, 2.0].contains(&at), "{r:?}");
    }
    // Two charts per method: the mean over seeds of each evaluation, per beta.
    let charts = summary["charts"].as_array().unwrap();
    assert_eq!(charts.len(), 4);
    let dpo_by_step = &charts[1];
    assert_eq!(dpo_by_step["marks"][0]["x"], 4);
    let lines = dpo_by_step["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["label"], "β = 0.1");
    let pts = lines[0]["points"].as_array().unwrap();
    assert_eq!(pts.len(), 5);
    assert_eq!(pts[0][1], rows[0][2], "the initial gold");
    // 8 steps per run (64 pairs in batches of 16, 2 epochs), evaluated every 2.
    let lines = metric_lines(&dir);
    assert_eq!(lines.len(), 3 * 4);
    for l in &lines {
        for k in [
            "reward/gold/mean",
            "kl/d",
            "kl/ref",
            "loss",
            "rewards/accuracies",
        ] {
            assert!(l[k].as_f64().unwrap().is_finite(), "{k}: {l:?}");
        }
        let (d, kl) = (l["kl/d"].as_f64().unwrap(), l["kl/ref"].as_f64().unwrap());
        assert!((d - kl.max(0.0).sqrt()).abs() < 1e-12);
    }
    // Gao's laws per method over every evaluation (1 initial + 4 per run).
    let fits = table(&summary, "DAA: Gao");
    assert_eq!(fits.len(), 2);
    assert_eq!(
        (fits[0][0].as_str(), fits[0][1].as_u64()),
        (Some("dpo"), Some(10))
    );
    assert_eq!(
        (fits[1][0].as_str(), fits[1][1].as_u64()),
        (Some("slic"), Some(5))
    );
    let steps: Vec<u64> = lines
        .iter()
        .take(4)
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 6, 8]);
    // Same seed, same numbers.
    let (again, _) = run(config, &root_b);
    assert_eq!(
        std::fs::read(dir.join("metrics.jsonl")).unwrap(),
        std::fs::read(again.join("metrics.jsonl")).unwrap()
    );
}

/// The `daa-hf` preset with its paths under the repository, changed by `sets`.
fn daa_hf(sets: &[&str]) -> Result<ExperimentConfig, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    ExperimentConfig::parse_at(presets::preset("daa-hf").unwrap(), &sets, &root)
        .map_err(|e| e.to_string())
}

#[test]
fn daa_on_a_hf_model_and_jsonl_pairs_writes_model_directories() {
    use goodhart_core::device::{cpu, Dispatch};
    use goodhart_policy::hf;
    let config = daa_hf(&[]).unwrap();
    let (root_a, root_b) = (scratch("daa-hf-a"), scratch("daa-hf-b"));
    let (a, summary) = run(config.clone(), &root_a);
    let (b, _) = run(config.clone(), &root_b);
    let _ = assert_run_files(&a, "daa-hf");
    // Same seed, same numbers, same weights.
    assert_eq!(
        std::fs::read(a.join("metrics.jsonl")).unwrap(),
        std::fs::read(b.join("metrics.jsonl")).unwrap()
    );
    let rows = table(&summary, "DAA");
    let runs: Vec<(&str, Option<f64>)> = rows
        .iter()
        .map(|r| (r[0].as_str().unwrap(), r[1].as_f64()))
        .collect();
    assert_eq!(runs, [("dpo", Some(0.1)), ("ipo", Some(0.1))]);
    // Both runs start from the model's weights and the same evaluation samples.
    assert_eq!(rows[0][2], rows[1][2]);
    // 6 pairs in batches of 2 for 2 epochs: 6 steps, evaluated every 2, per run.
    let lines = metric_lines(&a);
    assert_eq!(lines.len(), 2 * 3);
    for l in &lines {
        for k in ["reward/gold/mean", "reward/proxy/mean", "kl/d", "loss"] {
            assert!(l[k].as_f64().unwrap().is_finite(), "{k}: {l:?}");
        }
        // The proxy is a 0/1 format rule averaged over 8 samples.
        let eight = 8.0 * l["reward/proxy/mean"].as_f64().unwrap();
        assert!((eight - eight.round()).abs() < 1e-9, "{l:?}");
    }
    let steps: Vec<u64> = lines[..3]
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 6]);
    // Each trained policy is a model directory that loads, with weights training moved.
    let device = cpu();
    let fixture = config.policy.as_ref().unwrap().path.clone();
    let emb = |dir: &Path| -> Vec<f32> {
        let (m, _) = hf::load::<Dispatch>(dir, &device).unwrap();
        m.trunk
            .tok_emb
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap()
    };
    let initial = emb(&fixture);
    let policies = summary["daa"]["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 2);
    for (p, want) in policies.iter().zip([
        "checkpoints/daa/dpo/b0.1/s0/policy",
        "checkpoints/daa/ipo/b0.1/s0/policy",
    ]) {
        assert_eq!(p, want);
        let dir = a.join(want);
        assert!(dir.join("tokenizer.json").is_file());
        assert_ne!(emb(&dir), initial, "{want}");
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            std::fs::read(b.join(want).join("model.safetensors")).unwrap()
        );
    }
}

#[test]
fn daa_on_a_model_directory_rejects_bad_input_before_any_work() {
    for (sets, want) in [
        (vec!["daa.pairs=10"], "daa.pairs"),
        (vec!["daa.label_noise=0.2"], "daa.label_noise"),
        (vec!["daa.max_new_tokens=0"], "daa.max_new_tokens"),
        (vec!["daa.max_new_tokens=100000"], "daa.max_new_tokens"),
        (
            vec!["rewards.gold={kind = \"math_verify\"}"],
            "data.columns.answer",
        ),
        (
            vec!["data.path=\"crates/goodhart-train/fixtures/data/prompts.jsonl\""],
            "chosen",
        ),
        // Its conversational pairs do not fit the fixture's 64 positions.
        (
            vec!["data.path=\"crates/goodhart-train/fixtures/data/preferences.jsonl\""],
            "line 3, rejected",
        ),
    ] {
        let e = daa_hf(&sets).unwrap_err();
        assert!(e.contains(want), "{sets:?}: {e}");
    }
    // A pair longer than the model's 64 positions, named by its line.
    let dir = scratch("daa-hf-long");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("long.jsonl");
    let long = "word ".repeat(100);
    std::fs::write(
        &file,
        format!(
            "{{\"prompt\": \"Hi\", \"chosen\": \"Hello.\", \"rejected\": \"No.\"}}\n\
             {{\"prompt\": \"Hi\", \"chosen\": \"{long}\", \"rejected\": \"No.\"}}\n"
        ),
    )
    .unwrap();
    let e = daa_hf(&[&format!("data.path={:?}", file.display().to_string())]).unwrap_err();
    assert!(
        e.contains("line 2, chosen") && e.contains("64 positions"),
        "{e}"
    );
    // Without [policy] and [data], the synthetic language bounds responses itself.
    let e = ExperimentConfig::parse(
        presets::preset("daa").unwrap(),
        &["daa.max_new_tokens=8".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("daa.max_new_tokens"), "{e}");
}

#[test]
fn a_trl_named_csv_of_a_run_fires_where_the_lab_detector_did() {
    use goodhart_metrics::{
        detect::DetectorConfig,
        evaluate::{detect_run, GoldPeakRule},
        training_log::{columns_for, proxy_only_for, read_log, LogSpec},
    };
    // A sensitive proxy-only detector, as `cargo xtask detect --config` reads it.
    let fields = [
        "kind = \"proxy-only\"",
        "warmup = 3",
        "threshold = 1.0",
        "patience = 1",
        "signals = [{ key = \"kl/ref\", transform = \"level\", direction = \"up\" }, \
         { key = \"entropy\", transform = \"level\", direction = \"down\" }]",
    ];
    let config: DetectorConfig = toml::from_str(&fields.join("\n")).unwrap();
    // And a logistic one over three signals, one of them a TRL column of another name.
    let logistic_fields = [
        "kind = \"logistic\"",
        "features = [{ key = \"kl/ref\", transform = \"change\", window = 2 }, \
         { key = \"entropy\", transform = \"ratio\", window = 2 }, \
         { key = \"length/mean\", transform = \"level\", window = 1 }]",
        "weights = [2000.0, -5.0, 0.01]",
        "bias = 0.0",
        "threshold = 0.9",
    ];
    let logistic: DetectorConfig = toml::from_str(&logistic_fields.join("\n")).unwrap();
    let detectors = format!(
        "overopt.detectors=[{{ {} }}, {{ {} }}]",
        fields.join(", "),
        logistic_fields.join(", ")
    );
    let root = scratch("detect-csv");
    let (dir, summary) = run(
        tiny(
            "overopt",
            &["overopt.pairs=[20]", "rl.steps=12", &detectors],
        ),
        &root,
    );
    let fired_by = |detector: &str| {
        summary["detections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["series"] == "rl p20" && d["detector"] == detector)
            .map(|d| d["step"].as_u64().unwrap())
    };
    let fired = fired_by("proxy-only").expect("the lab's detector fired on the RL run");
    // The run's RL series as a trainer's CSV, in TRL's column names.
    let mut csv = String::from("step,kl,entropy,completions/mean_length,eval_gold\n");
    for l in metric_lines(&dir)
        .iter()
        .filter(|l| l["series"] == "rl p20")
    {
        let v = |k: &str| l[k].as_f64().unwrap();
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            l["step"],
            v("kl/ref"),
            v("entropy"),
            v("length/mean"),
            v("reward/gold/mean")
        ));
    }
    let file = root.join("trl_log.csv");
    std::fs::write(&file, csv).unwrap();
    let maps: Vec<(String, String)> = [("kl/ref", "kl"), ("entropy", "entropy")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let rule = GoldPeakRule::default();
    let mut columns = columns_for(&config, &maps).unwrap();
    columns.push((rule.gold_key.clone(), "eval_gold".into()));
    let spec = LogSpec {
        format: None,
        step_key: "step".into(),
        columns,
        filter: None,
    };
    let log = read_log(&file, &spec).unwrap();
    let out = detect_run(&log, config.build().unwrap(), &rule).unwrap();
    assert_eq!(out.firing.as_ref().map(|f| f.step), Some(fired));
    let peak = out.gold_peak.unwrap().step;
    assert_eq!(out.lead, Some(peak as i64 - fired as i64));
    assert!(out.stopping_regret.is_some_and(|r| r.is_finite()));
    // The logistic detector reads the same CSV, `length/mean` from TRL's column, and
    // fires where it did in the lab.
    let mut logistic_maps = maps.clone();
    logistic_maps.push(("length/mean".into(), "completions/mean_length".into()));
    let logistic_spec = LogSpec {
        columns: columns_for(&logistic, &logistic_maps).unwrap(),
        ..spec.clone()
    };
    let logistic_log = read_log(&file, &logistic_spec).unwrap();
    let out = detect_run(&logistic_log, logistic.build().unwrap(), &rule).unwrap();
    let in_lab = fired_by("logistic").expect("the lab's logistic detector fired");
    assert_eq!(out.firing.map(|f| f.step), Some(in_lab));
    // goodhart's own metrics.jsonl, one series of it, gives the same.
    let own = LogSpec {
        columns: columns_for(&config, &[]).unwrap(),
        filter: Some(("series".into(), "rl p20".into())),
        ..spec.clone()
    };
    let own = read_log(&dir.join("metrics.jsonl"), &own).unwrap();
    let again = detect_run(&own, config.build().unwrap(), &rule).unwrap();
    assert_eq!(again.firing.map(|f| f.step), Some(fired));
    // A misspelt signal or column is an error naming it, never a silent non-firing.
    let e = columns_for(&config, &[("entropyy".into(), "entropy".into())]).unwrap_err();
    assert!(e.contains("no signal `entropyy`"), "{e}");
    let e = proxy_only_for(&[("klref".into(), "kl".into())]).unwrap_err();
    assert!(
        e.contains("no signal `klref`") && e.contains("kl/ref"),
        "{e}"
    );
    assert!(proxy_only_for(&[]).is_err());
    let bad = LogSpec {
        columns: columns_for(&config, &[("kl/ref".into(), "KL".into())]).unwrap(),
        ..spec
    };
    let e = read_log(&file, &bad).unwrap_err().to_string();
    assert!(e.contains("no column `KL` (for `kl/ref`)"), "{e}");
}

#[test]
fn tiny_detector_corpus_preset() {
    let config = tiny(
        "detector-corpus",
        &[
            "rl.steps=8",
            "rl.effective_rank=true",
            "rl.eval={ samples = 12 }",
            "detector_corpus.calibration_seeds=1",
            "detector_corpus.test_seeds=1",
            "detector_corpus.settings=[{ name = \"p20\", pairs = 20 }, { name = \"gold\", pairs = 20, control = true, rl = { components = [{ name = \"gold\" }] } }, { name = \"p20n\", pairs = 20, label_noise = 0.4, test_only = true }]",
            "detector_corpus.resamples=50",
            "detector_corpus.plateau_window=2",
        ],
    );
    // The preset with one key set (`refused`: its `settings`): the error it is refused
    // with.
    let refused_with = |set: String| {
        ExperimentConfig::parse(presets::preset("detector-corpus").unwrap(), &[set])
            .unwrap_err()
            .to_string()
    };
    let refused = |settings: &str| refused_with(format!("detector_corpus.settings=[{settings}]"));
    // A corpus without a control cannot count false alarms; nor can one whose only
    // control the calibration never sees.
    let err = refused("{ name = \"a\", pairs = 20 }");
    assert!(
        err.contains("detector_corpus.settings") && err.contains("control"),
        "{err}"
    );
    let err = refused(
        "{ name = \"a\", pairs = 20 }, { name = \"c\", pairs = 20, control = true, test_only = true }",
    );
    assert!(
        err.contains("control") && err.contains("test_only"),
        "{err}"
    );
    // A label noise is a probability.
    let err = refused("{ name = \"c\", pairs = 20, control = true, label_noise = 1.5 }");
    assert!(
        err.contains("detector_corpus.settings[0].label_noise"),
        "{err}"
    );
    // The peak is read from a gold key the runs log: the evaluation batch's needs it on.
    for (set, key) in [
        (
            "detector_corpus.peak.gold_key=\"eval/gold/maen\"",
            "detector_corpus.peak.gold_key",
        ),
        ("rl.eval.samples=0", "rl.eval.samples"),
    ] {
        let err = refused_with(set.into());
        assert!(err.contains(key), "{set}: {err}");
    }
    let root = scratch("corpus");
    let (dir, summary) = run(config, &root);
    let _ = assert_run_files(&dir, "detector-corpus");
    // Two settings x two splits, one trace each.
    let traces = table(&summary, "Detector corpus: traces");
    let rows: Vec<(&str, &str, u64)> = traces
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap(),
                r[2].as_str().unwrap(),
                r[3].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("p20", "calibration", 1),
            ("p20", "test", 1),
            ("gold", "calibration", 1),
            ("gold", "test", 1),
            ("p20n", "test", 1)
        ]
    );
    // Each trace's peak is where its evaluation batch's gold peaks (the first maximum of
    // the centred mean of 5), not its training batch's.
    let lines = metric_lines(&dir);
    let peak_of = |series: &str, key: &str| -> usize {
        let g: Vec<f64> = lines
            .iter()
            .filter(|l| l["series"] == series)
            .map(|l| l[key].as_f64().unwrap())
            .collect();
        let smooth: Vec<f64> = (0..g.len())
            .map(|i| {
                let (lo, hi) = (i.saturating_sub(2), (i + 3).min(g.len()));
                g[lo..hi].iter().sum::<f64>() / (hi - lo) as f64
            })
            .collect();
        (0..smooth.len()).fold(0, |best, i| if smooth[i] > smooth[best] { i } else { best })
    };
    let seeds = ["s0", "s1", "s0", "s1", "s1"];
    for (row, seed) in traces.iter().zip(seeds) {
        let series = format!("{}/{seed}", row[0].as_str().unwrap());
        let peak = peak_of(&series, "eval/gold/mean");
        assert_eq!(row[5].as_f64().unwrap(), peak as f64, "{series}");
    }
    assert!(
        ["p20/s0", "p20/s1", "gold/s0", "gold/s1", "p20n/s1"]
            .iter()
            .any(|s| peak_of(s, "eval/gold/mean") != peak_of(s, "reward/gold/mean")),
        "the two golds peak at the same step on every trace: the test cannot tell them apart"
    );
    // The test-only setting ran on the test seed alone, against a proxy and a held-out
    // proxy of its own label noise (their own stages and files, beside the plain ones).
    let checkpoints = dir.join("checkpoints");
    for file in [
        "lm/s1/proxy-p20-k1-n0p4-m0.mpk",
        "lm/s1/heldout-p20-n0p4.mpk",
        "lm/s1/proxy-p20-k1-m0.mpk",
        "lm/s1/heldout-p20.mpk",
    ] {
        assert!(checkpoints.join(file).is_file(), "{file}");
    }
    assert!(!checkpoints.join("lm/s0/proxy-p20-k1-n0p4-m0.mpk").exists());
    // The detectors (a kind listed twice named by its place), the three baselines and the
    // two references that read gold; training to the end never stops early.
    let rules = table(&summary, "Detector corpus: rules");
    let names: Vec<&str> = rules.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "proxy-only #0",
            "proxy-only #1",
            "proxy-only on gap/heldout",
            "cusum on kl/ref",
            "cusum on entropy",
            "cusum on gap/heldout",
            "cusum on ood/mean",
            "proxy-only on ood/mean",
            "cusum on hidden/effective_rank",
            "cusum on eval/ood/mean",
            "proxy-only on eval/ood/mean",
            "cusum on eval/gap/heldout",
            "shift on advantage/skew",
            "logistic",
            "logistic on kl/ref, advantage/skew, entropy, hidden/effective_rank, ood/mean, reward/proxy/mean, length/mean, gap/heldout",
            "gold-aware on reward/heldout/mean",
            "gold-aware on eval/gold/mean",
            "gold-aware",
            "end",
            "proxy-plateau",
            "kl-budget",
            "gold peak -1",
            "gold peak +1"
        ]
    );
    let rule = |name: &str| {
        rules
            .iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("no rule {name}"))
    };
    // Early stopping on the evaluation batch's gold reads gold, as the plain one does.
    for name in ["gold-aware on eval/gold/mean", "gold-aware"] {
        assert_eq!(rule(name)[1], "as configured (reads gold)", "{name}");
    }
    assert_eq!(
        rule("gold-aware on reward/heldout/mean")[1],
        "as configured"
    );
    // The shift detector's threshold is calibrated, as CUSUM's is.
    let shift = rule("shift on advantage/skew")[1].as_str().unwrap();
    assert!(shift.starts_with("threshold "), "{shift}");
    // A logistic detector is fitted on the calibration traces that hacked: this tiny
    // corpus has none (8 steps), and its rows say so rather than stop nothing.
    for name in ["logistic", "logistic on kl/ref, advantage/skew, entropy, hidden/effective_rank, ood/mean, reward/proxy/mean, length/mean, gap/heldout"] {
        let row = rule(name);
        let note = row[1].as_str().unwrap();
        assert!(
            note.starts_with("not fitted") && note.contains("no calibration trace hacked"),
            "{name}: {note}"
        );
        assert!(row[2].is_null(), "{row:?}");
    }
    let end = rule("end");
    assert!(end[2].as_str().unwrap().starts_with("0/"), "{end:?}");
    assert!(end[4].as_str().unwrap().starts_with("0/"), "{end:?}");
    // The references that read gold stop every trace (a step beside its gold peak): all
    // the hacking traces and all the controls.
    for reference in [rule("gold peak -1"), rule("gold peak +1")] {
        for col in [2, 4] {
            let cell = reference[col].as_str().unwrap();
            let (n, of) = cell.split_once('/').unwrap();
            assert_eq!(n, of, "{reference:?}");
        }
    }
    // Each trace is an RL series of 8 steps, with the held-out proxy's mean and the
    // proxy's mean minus it, and the summary of the out-of-distribution score (a
    // distance, not a reward: no `reward/ood/...`, no gap); the samples carry both
    // scores, whose means (and extremes) are the line's.
    let samples = jsonl(&dir, "samples.jsonl");
    assert!(!lines.iter().any(|l| l["series"] == "p20n/s0"));
    for series in ["p20/s0", "p20/s1", "gold/s0", "gold/s1", "p20n/s1"] {
        let mine: Vec<_> = lines.iter().filter(|l| l["series"] == series).collect();
        assert_eq!(mine.len(), 8, "{series}");
        for l in mine {
            let of = |k: &str| {
                let v: Vec<f64> = samples
                    .iter()
                    .filter(|s| s["series"] == series && s["step"] == l["step"])
                    .map(|s| s["rewards"][k].as_f64().unwrap())
                    .collect();
                v.iter().sum::<f64>() / v.len() as f64
            };
            let (heldout, proxy) = (of("heldout"), of("proxy"));
            let logged = l["reward/heldout/mean"].as_f64().unwrap();
            assert!((logged - heldout).abs() < 1e-6, "{logged} vs {heldout}");
            let gap = l["gap/heldout"].as_f64().unwrap();
            assert!((gap - (proxy - heldout)).abs() < 1e-6, "{gap}");
            let ood: Vec<f64> = samples
                .iter()
                .filter(|s| s["series"] == series && s["step"] == l["step"])
                .map(|s| s["rewards"]["ood"].as_f64().unwrap())
                .collect();
            assert!(ood.iter().all(|&d| d > 0.0), "{ood:?}");
            let mean = ood.iter().sum::<f64>() / ood.len() as f64;
            assert!((l["ood/mean"].as_f64().unwrap() - mean).abs() < 1e-9);
            let max = ood.iter().copied().fold(f64::MIN, f64::max);
            assert!((l["ood/max"].as_f64().unwrap() - max).abs() < 1e-12);
            assert!(l.get("reward/ood/mean").is_none() && l.get("gap/ood").is_none());
            // The effective rank of 8 pooled hidden states, centred: rank at most 7.
            let er = l["hidden/effective_rank"].as_f64().unwrap();
            assert!(er > 1.0 && er <= 7.0, "{er}");
            // The evaluation batch's monitors: the held-out gap is the means' difference,
            // the out-of-distribution score a distance.
            let eval = |k: &str| l[&format!("eval/{k}")].as_f64().unwrap();
            let gap = eval("proxy/mean") - eval("heldout/mean");
            assert!((eval("gap/heldout") - gap).abs() < 1e-12, "{gap}");
            assert!(eval("ood/min") > 0.0 && eval("ood/min") <= eval("ood/mean"));
            assert!(eval("ood/mean") <= eval("ood/max"));
        }
    }
}
