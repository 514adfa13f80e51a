//! Overoptimisation curves in the style of Gao, Schulman & Hilton (2022), on the
//! synthetic language.
//!
//! Stages, for each seed, reward-model size and pairs count (an arm, named
//! `p{pairs}[/l{layers}d{d_model}][/s{seed}]`: the size part when `proxy_sizes` is set,
//! the seed part when `seeds > 1`):
//! - `lm/sft/s{seed}` and the proxy's `lm/proxy/...` stage ([`super::lm`]);
//! - `overopt/rl/{arm}`: RL against that proxy (the `[rl]` algorithm, as configured: the
//!   preset has no KL), gold measured on every batch;
//! - `overopt/bon/{arm}`: best-of-n against that proxy from the base policy.
//!
//! The summary fits gold against `d = sqrt(KL(pi || pi_base))` with the RL law
//! `d (alpha - beta ln d)` and the best-of-n law `d (alpha - beta d)`, both relative to
//! the base policy's gold, reports where gold peaked and how far it fell, and runs the
//! gold-aware and proxy-only detectors over each RL trace (lead/lag to the gold peak).
//! Over seeds it gives each coefficient's mean with a bootstrap interval per size and
//! pairs count, and its trend in `ln pairs` and in `ln` reward-model parameters.

use std::collections::BTreeMap;

use burn::{module::Module, tensor::backend::AutodiffBackend};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_envs::language::Language;
use goodhart_metrics::{
    detect::{DetectorConfig, GoldAwareConfig, ProxyOnlyConfig},
    evaluate::{evaluate, GoldPeak, GoldPeakRule},
    overopt::{fit, OveroptFit, OveroptLaw},
    stats,
};

use super::{
    lm::{
        self, base_policy, bon_stage, language, proxies, rl_stage, Monitors, ProxySize, ProxySpec,
        Trace,
    },
    mean_sd, seed_mean, stage_error, table, Experiment, Part, SeedMean,
};
use crate::{
    best_of_n::BonPoint,
    config::{at, positive, section, ConfigError, ExperimentConfig},
    reward_model::ProxyReport,
    runner::{Result, Runner},
    sft::SftReport,
};

/// Gao et al.'s experiment: proxies from increasing numbers of pairs; RL and best-of-n
/// against each; gold against `d = sqrt(KL)` with the fitted laws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OveroptExperiment {
    /// Preference pairs of each proxy, increasing.
    pub pairs: Vec<usize>,
    /// Seeds `seed`, `seed + 1`, ...: each its own base policy, proxies and runs.
    pub seeds: usize,
    /// Reward-model sizes: a proxy of each size on each pairs count (empty: `[proxy]`'s
    /// size only).
    pub proxy_sizes: Vec<ProxySize>,
    /// Best-of-n against each proxy.
    pub best_of_n: BestOfNConfig,
    /// Hacking detectors replayed over each RL trace, chosen by `kind` (default: the
    /// gold-aware and the proxy-only detector with goodhart-metrics' defaults).
    pub detectors: Vec<DetectorConfig>,
}

impl Default for OveroptExperiment {
    fn default() -> Self {
        Self {
            pairs: vec![100, 1000],
            seeds: 1,
            proxy_sizes: Vec::new(),
            best_of_n: BestOfNConfig::default(),
            detectors: vec![
                DetectorConfig::GoldAware(GoldAwareConfig::default()),
                DetectorConfig::ProxyOnly(ProxyOnlyConfig::default()),
            ],
        }
    }
}

/// Best-of-n sampling: the unbiased estimator over `samples_per_prompt` samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BestOfNConfig {
    /// The values of n.
    pub ns: Vec<usize>,
    /// Samples per prompt (at least the largest n).
    pub samples_per_prompt: usize,
    /// Prompts.
    pub prompts: usize,
}

impl Default for BestOfNConfig {
    fn default() -> Self {
        Self {
            ns: vec![1, 2, 4, 8, 16, 32, 64],
            samples_per_prompt: 128,
            prompts: 16,
        }
    }
}

impl BestOfNConfig {
    /// Errors on settings that cannot estimate the curve; `path` names the section.
    pub fn validate(&self, path: &str) -> std::result::Result<(), ConfigError> {
        positive(&format!("{path}.prompts"), self.prompts)?;
        let max_n = self.ns.iter().copied().max().unwrap_or(0);
        if self.ns.contains(&0) || self.ns.is_empty() {
            return Err(ConfigError::invalid(
                format!("{path}.ns"),
                "must be a non-empty list of positive integers",
            ));
        }
        if self.samples_per_prompt < max_n {
            return Err(ConfigError::invalid(
                format!("{path}.samples_per_prompt"),
                format!(
                    "{} is below the largest n ({max_n})",
                    self.samples_per_prompt
                ),
            ));
        }
        Ok(())
    }
}

/// Everything the overopt stages produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OveroptOutput {
    /// The base policy of each seed.
    pub base: Vec<SftReport>,
    /// Per seed, size and pairs count: the proxy's fit, the RL trace and the best-of-n
    /// curve.
    pub arms: Vec<OveroptArm>,
}

/// One proxy of the experiment, with its runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OveroptArm {
    /// Its name: `p{pairs}[/l{layers}d{d_model}][/s{seed}]`.
    pub name: String,
    /// The seed of its base policy, proxy and runs.
    pub seed: u64,
    /// Its reward models' size (`None`: `[proxy]`'s).
    pub size: Option<ProxySize>,
    /// Parameters of its reward model.
    pub proxy_params: usize,
    /// Pairs the proxy was trained on.
    pub pairs: usize,
    /// How well it fits.
    pub proxy: ProxyReport,
    /// RL against it.
    pub rl: Trace,
    /// Best-of-n against it.
    pub bon: Vec<BonPoint>,
}

impl Experiment for OveroptExperiment {
    const NAME: &'static str = "overopt";
    const SUMMARY: &'static str =
        "base policy, proxies from more and more pairs, RL and best-of-n against each (Gao et al.)";
    type Output = OveroptOutput;

    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        if self.pairs.is_empty() {
            return Err(ConfigError::invalid("overopt.pairs", "is empty"));
        }
        for (i, &p) in self.pairs.iter().enumerate() {
            positive(&format!("overopt.pairs[{i}]"), p)?;
        }
        positive("overopt.seeds", self.seeds)?;
        let lang = Language::new(config.language.clone()).map_err(|e| at("language", e))?;
        for (i, &size) in self.proxy_sizes.iter().enumerate() {
            let path = format!("overopt.proxy_sizes[{i}]");
            if self.proxy_sizes[..i].contains(&size) {
                return Err(ConfigError::invalid(path, "repeats an earlier size"));
            }
            positive(&format!("{path}.layers"), size.layers)?;
            positive(&format!("{path}.d_model"), size.d_model)?;
            let cfg = ProxySpec::single(1).sized(Some(size)).config(config);
            cfg.validate(&lang).map_err(|e| at(&path, e))?;
        }
        self.best_of_n.validate("overopt.best_of_n")?;
        // Overopt trains against one reward model per pairs count.
        lm::validate(config, &config.rl, "rl", 1)?;
        section(
            "overopt",
            crate::policy_gradient::check_detectors(
                "overopt.detectors",
                &self.detectors,
                &config.rl.logged_keys(),
            ),
        )?;
        Ok(())
    }

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<OveroptOutput> {
        run::<B>(runner, config, self, device)
    }

    fn summarize(&self, output: &OveroptOutput) -> Part {
        summarize(self, output)
    }
}

/// The arms of `cfg`, in run order (seed, then size, then pairs count): name, seed, size
/// and pairs.
fn arm_names(
    config: &ExperimentConfig,
    cfg: &OveroptExperiment,
) -> Vec<(String, u64, Option<ProxySize>, usize)> {
    let sizes: Vec<Option<ProxySize>> = if cfg.proxy_sizes.is_empty() {
        vec![None]
    } else {
        cfg.proxy_sizes.iter().copied().map(Some).collect()
    };
    let mut out = Vec::new();
    for i in 0..cfg.seeds {
        let seed = config.seed + i as u64;
        for &size in &sizes {
            for &pairs in &cfg.pairs {
                let mut name = format!("p{pairs}");
                if let Some(s) = size {
                    name += &format!("/{}", s.tag());
                }
                if cfg.seeds > 1 {
                    name += &format!("/s{seed}");
                }
                out.push((name, seed, size, pairs));
            }
        }
    }
    out
}

/// Runs the experiment.
pub fn run<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &OveroptExperiment,
    device: &B::Device,
) -> Result<OveroptOutput> {
    let mut base = Vec::new();
    let mut arms = Vec::new();
    for (arm, seed, size, pairs) in arm_names(config, cfg) {
        // Arms come seed by seed: a new seed's first arm trains its base policy.
        if arms.last().is_none_or(|a: &OveroptArm| a.seed != seed) {
            base.push(base_policy::<B>(runner, config, seed, device)?);
        }
        let spec = ProxySpec::single(pairs).sized(size);
        let proxy = proxies::<B>(runner, config, spec, seed, device)?.remove(0);
        let rl = rl_stage::<B>(
            runner,
            config,
            &format!("overopt/rl/{arm}"),
            "overopt",
            &format!("rl {arm}"),
            &config.rl,
            seed,
            spec,
            None,
            Monitors::default(),
            device,
        )?;
        let bon = bon_stage::<B>(
            runner,
            config,
            &format!("overopt/bon/{arm}"),
            "overopt",
            &format!("bon {arm}"),
            spec,
            seed,
            &cfg.best_of_n,
            device,
        )?;
        let proxy_params = {
            let lang = language(config, "overopt")?;
            spec.config(config)
                .model(&lang)
                .init::<B::InnerBackend>(device)
                .map_err(stage_error("overopt"))?
                .num_params()
        };
        arms.push(OveroptArm {
            name: arm,
            seed,
            size,
            proxy_params,
            pairs,
            proxy,
            rl,
            bon,
        });
    }
    Ok(OveroptOutput { base, arms })
}

/// The fit of `law` to `(d, gold - offset)`: in the report's format (with its R^2 and the
/// `d` of its peak), and the fit; `None` when it cannot be fitted.
pub(crate) fn fit_json(
    series: &str,
    law: OveroptLaw,
    d: &[f64],
    gold: &[f64],
    offset: f64,
) -> Option<(Value, OveroptFit)> {
    let rel: Vec<f64> = gold.iter().map(|g| g - offset).collect();
    let f = fit(law, d, &rel, false).ok()?;
    let form = match law {
        OveroptLaw::Rl => "rl",
        OveroptLaw::BestOfN => "bon",
    };
    Some((
        json!({"series": series, "form": form, "alpha": f.alpha, "beta": f.beta,
               "r2": f.r_squared, "offset": offset, "peak_d": f.peak().map(|p| p.d)}),
        f,
    ))
}

/// One arm's fits and smoothed gold peak, for the tables over seeds.
struct Fitted<'a> {
    arm: &'a OveroptArm,
    rl: Option<OveroptFit>,
    bon: Option<OveroptFit>,
    peak: Option<GoldPeak>,
}

/// The coefficients the tables over seeds summarise: name and how to read it.
type Coefficient = (&'static str, fn(&Fitted) -> Option<f64>);

const COEFFICIENTS: [Coefficient; 4] = [
    ("RL alpha", |f| f.rl.as_ref().map(|f| f.alpha)),
    ("RL beta", |f| f.rl.as_ref().map(|f| f.beta)),
    ("BoN alpha", |f| f.bon.as_ref().map(|f| f.alpha)),
    ("BoN beta", |f| f.bon.as_ref().map(|f| f.beta)),
];

/// The RL run's smoothed gold peak ([`Trace::peak`]).
const GOLD_PEAK: Coefficient = ("gold peak", |f| f.peak.map(|p| p.value));

/// Fits, peaks and detectors (`cfg.detectors`, replayed over each RL trace) of each
/// arm's curves; with several seeds, each coefficient's mean over seeds per size and
/// pairs count, and its trends in `ln pairs` and `ln` reward-model parameters.
pub fn summarize(cfg: &OveroptExperiment, out: &OveroptOutput) -> Part {
    let mut figures = serde_json::Map::new();
    figures.insert(
        "base_heldout_nll".into(),
        json!(mean_sd(out.base.iter().map(|b| b.heldout_nll)).0),
    );
    figures.insert(
        "entropy_rate".into(),
        json!(mean_sd(out.base.iter().map(|b| b.entropy_rate)).0),
    );
    let mut fits = Vec::new();
    let mut rows = Vec::new();
    let mut detections = Vec::new();
    let mut det_rows = Vec::new();
    let mut fitted = Vec::new();
    for arm in &out.arms {
        let t = &arm.rl;
        let d: Vec<f64> = t.points.iter().map(|p| p.d).collect();
        let g: Vec<f64> = t.points.iter().map(|p| p.gold).collect();
        let g0 = t.points.first().map_or(f64::NAN, |p| p.gold);
        let rl_fit = fit_json(&t.series, OveroptLaw::Rl, &d, &g, g0);
        let bd: Vec<f64> = arm.bon.iter().map(|p| p.d).collect();
        let bg: Vec<f64> = arm.bon.iter().map(|p| p.gold).collect();
        let b0 = arm.bon.first().map_or(f64::NAN, |p| p.gold);
        let bon_fit = fit_json(
            &format!("bon {}", arm.name),
            OveroptLaw::BestOfN,
            &bd,
            &bg,
            b0,
        );
        let peak = t.peak();
        let last = t.points.last();
        let r2 = |f: &Option<(Value, OveroptFit)>| f.as_ref().map(|f| f.1.r_squared);
        figures.insert(
            arm.name.clone(),
            json!({
                "proxy_params": arm.proxy_params,
                "proxy_heldout_acc": arm.proxy.heldout_acc,
                "proxy_gold_pearson": arm.proxy.gold_pearson,
                "rl_gold_initial": g0,
                "rl_gold_peak": peak.map(|p| p.value),
                "rl_gold_peak_interval": peak.and_then(|p| p.interval),
                "rl_gold_peak_step": peak.map(|p| p.step),
                "rl_gold_final": last.map(|p| p.gold),
                "rl_proxy_initial": t.points.first().map(|p| p.proxy),
                "rl_proxy_final": last.map(|p| p.proxy),
                "rl_gold_drop_fraction": t.drop_fraction(),
                "rl_fit_r2": r2(&rl_fit),
                "rl_fit_peak_d": rl_fit.as_ref().and_then(|f| f.1.peak()).map(|p| p.d),
                "bon_fit_r2": r2(&bon_fit),
                "bon_gold_max": bg.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            }),
        );
        rows.push(json!([
            arm.pairs,
            arm.proxy_params,
            arm.seed,
            arm.proxy.heldout_acc,
            g0,
            peak.map(|p| p.value),
            peak.and_then(|p| p.interval)
                .map(|(lo, hi)| format!("[{lo:.3}, {hi:.3}]")),
            peak.map(|p| p.step),
            last.map(|p| p.gold),
            t.drop_fraction(),
            r2(&rl_fit),
            r2(&bon_fit),
        ]));
        fitted.push(Fitted {
            arm,
            rl: rl_fit.as_ref().map(|f| f.1),
            bon: bon_fit.as_ref().map(|f| f.1),
            peak,
        });
        fits.extend(rl_fit.map(|f| f.0));
        fits.extend(bon_fit.map(|f| f.0));
        // Detectors, replayed over the trace as they would run online.
        let run = t.to_run();
        for det in &cfg.detectors {
            let make = || det.build();
            let ev = match evaluate(std::slice::from_ref(&run), &make, &GoldPeakRule::default()) {
                Ok(ev) => ev,
                Err(e) => {
                    let name = make().map_or("?", |d| d.name());
                    det_rows.push(json!([
                        name,
                        t.series,
                        null,
                        null,
                        null,
                        null,
                        e.to_string()
                    ]));
                    continue;
                }
            };
            for o in &ev.outcomes {
                if let Some(step) = o.fired_step {
                    detections
                        .push(json!({"detector": ev.detector, "step": step, "series": t.series}));
                }
                det_rows.push(json!([
                    ev.detector,
                    t.series,
                    o.fired_step,
                    o.peak_step,
                    o.hacked,
                    o.lead_lag,
                    ""
                ]));
            }
        }
    }
    // A proxy from more pairs should peak later or higher: checked along the pairs counts
    // of each seed and size.
    let groups = groups(&fitted, |f| (f.arm.seed, f.arm.size));
    let mut held = Vec::new();
    for group in groups.values().filter(|g| g.len() > 1) {
        let mut by_pairs = group.clone();
        by_pairs.sort_by_key(|f| f.arm.pairs);
        held.push(by_pairs.windows(2).all(|w| match (w[0].peak, w[1].peak) {
            (Some(a), Some(b)) => b.step > a.step || b.value > a.value,
            _ => false,
        }));
    }
    if !held.is_empty() {
        figures.insert(
            "more_pairs_peak_later_or_higher".into(),
            json!(held.iter().all(|&h| h)),
        );
        figures.insert(
            "more_pairs_peak_later_or_higher_count".into(),
            json!(format!(
                "{} of {}",
                held.iter().filter(|&&h| h).count(),
                held.len()
            )),
        );
    }
    let mut tables = vec![
        table(
            "Overoptimisation: RL (no KL) and best-of-n against each proxy",
            &[
                "pairs",
                "RM params",
                "seed",
                "proxy held-out acc",
                "gold initial",
                "gold peak (smoothed)",
                "peak 95%",
                "peak step",
                "gold final",
                "drop fraction",
                "RL fit R^2",
                "BoN fit R^2",
            ],
            rows,
        ),
        table(
            "Detectors on the RL traces (lead/lag = fired step - gold peak step)",
            &[
                "detector",
                "series",
                "fired",
                "gold peak",
                "hacked",
                "lead/lag",
                "error",
            ],
            det_rows,
        ),
    ];
    if cfg.seeds > 1 {
        tables.push(over_seeds(&fitted, &mut figures));
        tables.push(trends(cfg, &fitted, &mut figures));
    }
    Part {
        figures: Value::Object(figures),
        tables,
        fits,
        detections,
        ..Part::default()
    }
}

/// `fitted` grouped by `key`, groups and their members in run order.
fn groups<'a, 'b, K: Ord + Copy>(
    fitted: &'b [Fitted<'a>],
    key: impl Fn(&Fitted) -> K,
) -> BTreeMap<(usize, K), Vec<&'b Fitted<'a>>> {
    let mut first: BTreeMap<K, usize> = BTreeMap::new();
    let mut out: BTreeMap<(usize, K), Vec<&Fitted>> = BTreeMap::new();
    for (i, f) in fitted.iter().enumerate() {
        let k = key(f);
        let order = *first.entry(k).or_insert(i);
        out.entry((order, k)).or_default().push(f);
    }
    out
}

/// A [`SeedMean`] as its figure.
fn seed_mean_json(m: &Option<SeedMean>) -> Value {
    m.as_ref().map_or(
        Value::Null,
        |m| json!({"mean": m.mean, "lo": m.lo, "hi": m.hi, "positive": m.positive, "n": m.n}),
    )
}

/// Each coefficient and the smoothed gold peak per size and pairs count: mean over seeds
/// with its 95% bootstrap interval (figures `over_seeds/{pairs}[/{size}]`).
fn over_seeds(fitted: &[Fitted], figures: &mut serde_json::Map<String, Value>) -> Value {
    let mut rows = Vec::new();
    for ((_, (size, pairs)), group) in groups(fitted, |f| (f.arm.size, f.arm.pairs)) {
        let name = match size {
            Some(s) => format!("p{pairs}/{}", s.tag()),
            None => format!("p{pairs}"),
        };
        let mut row = vec![
            json!(pairs),
            json!(group[0].arm.proxy_params),
            json!(group.len()),
        ];
        let mut figure = serde_json::Map::new();
        let r2: Coefficient = ("RL R^2", |f| f.rl.as_ref().map(|f| f.r_squared));
        let columns = COEFFICIENTS.into_iter().chain([r2, GOLD_PEAK]);
        for (what, get) in columns {
            let values: Vec<f64> = group.iter().filter_map(|f| get(f)).collect();
            let m = seed_mean(&values, &format!("overopt/{name}/{what}"));
            row.push(json!(m.as_ref().map(|m| m.mean)));
            row.push(json!(m.as_ref().map(SeedMean::interval)));
            figure.insert(what.to_string(), seed_mean_json(&m));
        }
        figures.insert(format!("over_seeds/{name}"), Value::Object(figure));
        rows.push(Value::Array(row));
    }
    table(
        "Fits over seeds: mean and 95% bootstrap interval per proxy",
        &[
            "pairs",
            "RM params",
            "seeds",
            "RL alpha",
            "95%",
            "RL beta",
            "95%",
            "BoN alpha",
            "95%",
            "BoN beta",
            "95%",
            "RL R^2",
            "95%",
            "gold peak (smoothed)",
            "95%",
        ],
        rows,
    )
}

/// Each coefficient's (and the smoothed gold peak's) least-squares slope in `ln pairs`
/// (per size) and in `ln` reward-model parameters (the mean over pairs counts of the
/// slopes across sizes), computed per seed: the mean over seeds with its 95% bootstrap
/// interval, how many seeds' slopes are positive, and the trend it shows (rises or falls
/// when the interval excludes 0). Figures `trend/{coefficient}/{against}[/{size}]`.
fn trends(
    cfg: &OveroptExperiment,
    fitted: &[Fitted],
    figures: &mut serde_json::Map<String, Value>,
) -> Value {
    let seeds: Vec<u64> = groups(fitted, |f| f.arm.seed)
        .into_keys()
        .map(|(_, s)| s)
        .collect();
    let sizes: Vec<Option<ProxySize>> = groups(fitted, |f| f.arm.size)
        .into_keys()
        .map(|(_, s)| s)
        .collect();
    // The slope of `get` against `x` over the arms `pick` keeps of one seed (at least two
    // distinct x with a value), `None` otherwise.
    let slope_over = |seed: u64,
                      pick: &dyn Fn(&Fitted) -> bool,
                      x: fn(&Fitted) -> f64,
                      get: fn(&Fitted) -> Option<f64>| {
        let (xs, ys): (Vec<f64>, Vec<f64>) = fitted
            .iter()
            .filter(|f| f.arm.seed == seed && pick(f))
            .filter_map(|f| get(f).map(|y| (x(f), y)))
            .unzip();
        stats::slope(&xs, &ys).ok()
    };
    let ln_pairs: fn(&Fitted) -> f64 = |f| (f.arm.pairs as f64).ln();
    let ln_params: fn(&Fitted) -> f64 = |f| (f.arm.proxy_params as f64).ln();
    let mut rows = Vec::new();
    let mut row = |what: &str, against: &str, at: String, slopes: Vec<f64>| {
        let key = format!(
            "trend/{what}/{against}{}",
            if at.is_empty() {
                String::new()
            } else {
                format!("/{at}")
            }
        );
        let m = seed_mean(&slopes, &format!("overopt/{key}"));
        let trend = m.as_ref().map(|m| {
            if m.lo > 0.0 {
                "rises"
            } else if m.hi < 0.0 {
                "falls"
            } else {
                "none found"
            }
        });
        figures.insert(key, seed_mean_json(&m));
        rows.push(json!([
            what,
            against,
            at,
            m.as_ref().map(|m| m.mean),
            m.as_ref().map(SeedMean::interval),
            m.as_ref().map(|m| format!("{} of {}", m.positive, m.n)),
            trend,
        ]));
    };
    for (what, get) in COEFFICIENTS.into_iter().chain([GOLD_PEAK]) {
        if cfg.pairs.len() > 1 {
            for &size in &sizes {
                let slopes = seeds
                    .iter()
                    .filter_map(|&s| slope_over(s, &|f| f.arm.size == size, ln_pairs, get))
                    .collect();
                let at = size.map_or(String::new(), |s| s.tag());
                row(what, "ln pairs", at, slopes);
            }
        }
        if sizes.len() > 1 {
            let slopes = seeds
                .iter()
                .filter_map(|&s| {
                    let per_pairs: Vec<f64> = cfg
                        .pairs
                        .iter()
                        .filter_map(|&p| slope_over(s, &|f| f.arm.pairs == p, ln_params, get))
                        .collect();
                    (!per_pairs.is_empty())
                        .then(|| per_pairs.iter().sum::<f64>() / per_pairs.len() as f64)
                })
                .collect();
            row(what, "ln RM params", String::new(), slopes);
        }
    }
    table(
        "Coefficient trends over seeds: least-squares slope, mean and 95% bootstrap interval",
        &[
            "coefficient",
            "against",
            "RM size",
            "slope",
            "95%",
            "positive",
            "trend",
        ],
        rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::lm::TracePoint;

    /// An arm whose RL and best-of-n curves follow the laws exactly, with the given
    /// coefficients.
    fn arm(
        seed: u64,
        size: ProxySize,
        params: usize,
        pairs: usize,
        rl: (f64, f64),
        bon: (f64, f64),
    ) -> OveroptArm {
        let points = (0..13)
            .map(|i| {
                let d = 0.25 * i as f64;
                let law = if d > 0.0 {
                    d * (rl.0 - rl.1 * d.ln())
                } else {
                    0.0
                };
                TracePoint {
                    step: i,
                    d,
                    proxy: d,
                    gold: 0.5 + law,
                    metrics: BTreeMap::new(),
                }
            })
            .collect();
        let bon_points = [1usize, 2, 4, 8, 16, 32, 64]
            .iter()
            .map(|&n| {
                let kl = (n as f64).ln() - (n as f64 - 1.0) / n as f64;
                let d = kl.sqrt();
                BonPoint {
                    n,
                    kl,
                    d,
                    proxy: d,
                    gold: -0.5 + d * (bon.0 - bon.1 * d),
                }
            })
            .collect();
        OveroptArm {
            name: format!("p{pairs}/{}/s{seed}", size.tag()),
            seed,
            size: Some(size),
            proxy_params: params,
            pairs,
            proxy: ProxyReport {
                train_acc: 0.9,
                heldout_acc: 0.8,
                gold_pearson: 0.7,
                pairs,
            },
            rl: Trace {
                series: format!("rl p{pairs}/{}/s{seed}", size.tag()),
                points,
            },
            bon: bon_points,
        }
    }

    fn rows<'a>(part: &'a Part, title: &str) -> &'a Vec<Value> {
        part.tables
            .iter()
            .find(|t| t["title"].as_str().unwrap().starts_with(title))
            .unwrap()["rows"]
            .as_array()
            .unwrap()
    }

    /// Curves that follow the laws exactly, with RL alpha = 0.3 + 0.1 ln pairs + 0.05 ln
    /// params + 0.01 seed, RL beta = 0.2 ± 0.05 ln pairs, BoN alpha = 2 - 0.2 ln pairs
    /// ± 0.1 ln params and BoN beta = 0.1 + 0.03 ln params ± 0.02 ln pairs (plus for
    /// seed 0, minus for seed 1): the tables over seeds give those slopes and means.
    /// (Slopes that are zero in every seed would leave the verdict to rounding.)
    #[test]
    fn coefficients_and_trends_over_seeds_by_hand() {
        let small = ProxySize {
            layers: 1,
            d_model: 8,
        };
        let large = ProxySize {
            layers: 2,
            d_model: 16,
        };
        let cfg = OveroptExperiment {
            pairs: vec![100, 1000],
            seeds: 2,
            proxy_sizes: vec![small, large],
            ..OveroptExperiment::default()
        };
        let mut arms = Vec::new();
        for seed in 0..2u64 {
            for (size, params) in [(small, 1000usize), (large, 8000)] {
                for pairs in [100usize, 1000] {
                    let (lp, lq) = ((pairs as f64).ln(), (params as f64).ln());
                    let sign = if seed == 0 { 1.0 } else { -1.0 };
                    let rl = (
                        0.3 + 0.1 * lp + 0.05 * lq + 0.01 * seed as f64,
                        0.2 + sign * 0.05 * lp,
                    );
                    let bon = (
                        2.0 - 0.2 * lp + sign * 0.1 * lq,
                        0.1 + 0.03 * lq + sign * 0.02 * lp,
                    );
                    arms.push(arm(seed, size, params, pairs, rl, bon));
                }
            }
        }
        let base = SftReport {
            heldout_nll: 1.0,
            entropy_rate: 0.5,
            initial_nll: 3.0,
            final_loss: 1.0,
        };
        let part = summarize(
            &cfg,
            &OveroptOutput {
                base: vec![base.clone(), base],
                arms,
            },
        );
        let close = |v: &Value, want: f64| {
            let got = v.as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        };
        // Over seeds, l1d8 at 100 pairs: RL alpha 0.3 + 0.1 ln 100 + 0.05 ln 1000 + 0.005.
        let over = rows(&part, "Fits over seeds");
        assert_eq!(over.len(), 4);
        let r = &over[0];
        assert_eq!(
            (r[0].as_u64(), r[1].as_u64(), r[2].as_u64()),
            (Some(100), Some(1000), Some(2))
        );
        close(&r[3], 0.3 + 0.1 * 100f64.ln() + 0.05 * 1000f64.ln() + 0.005);
        // RL beta: 0.2 + 0.05 ln 100 and 0.2 - 0.05 ln 100, mean 0.2; R^2 1.
        close(&r[5], 0.2);
        close(&r[11], 1.0);
        assert_eq!(
            (over[1][0].as_u64(), over[2][1].as_u64()),
            (Some(1000), Some(8000))
        );
        let f = &part.figures;
        let trend = |key: &str| &f[key];
        // RL alpha rises by 0.1 per ln pairs in every seed: a zero-width interval at 0.1.
        let t = trend("trend/RL alpha/ln pairs/l1d8");
        close(&t["mean"], 0.1);
        close(&t["lo"], 0.1);
        close(&t["hi"], 0.1);
        assert_eq!(t["positive"], 2);
        // ... and by 0.05 per ln params.
        close(&trend("trend/RL alpha/ln RM params")["mean"], 0.05);
        // RL beta: slopes +0.05 and -0.05, mean 0; the resampled means are -0.05, 0, 0.05.
        let t = trend("trend/RL beta/ln pairs/l2d16");
        close(&t["mean"], 0.0);
        close(&t["lo"], -0.05);
        close(&t["hi"], 0.05);
        assert_eq!(t["positive"], 1);
        close(&trend("trend/BoN alpha/ln pairs/l1d8")["mean"], -0.2);
        close(&trend("trend/BoN beta/ln RM params")["mean"], 0.03);
        close(&trend("trend/BoN beta/ln pairs/l1d8")["mean"], 0.0);
        // The table's verdicts, in coefficient order: for each, ln pairs at each size,
        // then ln RM params; the gold peak's three rows last.
        let verdicts: Vec<&str> = rows(&part, "Coefficient trends")
            .iter()
            .map(|r| r[6].as_str().unwrap())
            .collect();
        assert_eq!(verdicts.len(), 15);
        assert_eq!(
            verdicts[..12],
            [
                "rises",
                "rises",
                "rises", // RL alpha
                "none found",
                "none found",
                "none found", // RL beta
                "falls",
                "falls",
                "none found", // BoN alpha
                "none found",
                "none found",
                "rises", // BoN beta
            ]
        );
    }
}
