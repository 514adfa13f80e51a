//! Overoptimisation curves in the style of Gao, Schulman & Hilton (2022), on the
//! synthetic language.
//!
//! Stages:
//! - `lm/sft/s{seed}` and `lm/proxy/p{pairs}/k1/s{seed}` ([`super::lm`]);
//! - `overopt/rl/p{pairs}`: RL against that proxy (the `[rl]` algorithm, as configured:
//!   the preset has no KL), gold measured on every batch;
//! - `overopt/bon/p{pairs}`: best-of-n against that proxy from the base policy.
//!
//! The summary fits gold against `d = sqrt(KL(pi || pi_base))` with the RL law
//! `d (alpha - beta ln d)` and the best-of-n law `d (alpha - beta d)`, both relative to
//! the base policy's gold, reports where gold peaked and how far it fell, and runs the
//! gold-aware and proxy-only detectors over each RL trace (lead/lag to the gold peak).

use std::collections::BTreeMap;

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_core::seed;
use goodhart_metrics::{
    detect::{DetectorConfig, GoldAwareConfig, ProxyOnlyConfig},
    evaluate::{evaluate, GoldPeakRule},
    overopt::{fit, OveroptLaw},
    step::{KEY_GOLD_MEAN, KEY_KL_D, KEY_PROXY_MEAN},
};
use goodhart_reward::Aggregator;

use super::{
    lm::{self, base_policy, language, load_base, load_proxy, proxies, rl_stage, Trace},
    stage_error, table, Experiment, Logger, Part,
};
use crate::{
    best_of_n::{best_of_n, BonPoint},
    config::{positive, section, ConfigError, ExperimentConfig},
    policy_gradient::LanguageGold,
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

/// Everything the overopt stages produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OveroptOutput {
    /// The base policy.
    pub base: SftReport,
    /// Per pairs count: the proxy's fit, the RL trace and the best-of-n curve.
    pub arms: Vec<OveroptArm>,
}

/// One proxy of the experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OveroptArm {
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
        let b = &self.best_of_n;
        positive("overopt.best_of_n.prompts", b.prompts)?;
        let max_n = b.ns.iter().copied().max().unwrap_or(0);
        if b.ns.contains(&0) || b.ns.is_empty() {
            return Err(ConfigError::invalid(
                "overopt.best_of_n.ns",
                "must be a non-empty list of positive integers",
            ));
        }
        if b.samples_per_prompt < max_n {
            return Err(ConfigError::invalid(
                "overopt.best_of_n.samples_per_prompt",
                format!("{} is below the largest n ({max_n})", b.samples_per_prompt),
            ));
        }
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

/// Runs the experiment.
pub fn run<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &OveroptExperiment,
    device: &B::Device,
) -> Result<OveroptOutput> {
    let seed = config.seed;
    let base = base_policy::<B>(runner, config, seed, device)?;
    let mut arms = Vec::new();
    for &pairs in &cfg.pairs {
        let proxy = proxies::<B>(runner, config, pairs, 1, seed, device)?.remove(0);
        let rl = rl_stage::<B>(
            runner,
            config,
            &format!("overopt/rl/p{pairs}"),
            "overopt",
            &format!("rl p{pairs}"),
            &config.rl,
            seed,
            (pairs, 1, Aggregator::Mean),
            None,
            false,
            device,
        )?;
        let name = format!("overopt/bon/p{pairs}");
        let checkpoints = runner.dir().checkpoints();
        let bon_cfg = &cfg.best_of_n;
        let bon = runner.stage(&name, |log| {
            let policy = load_base::<B::InnerBackend>(&checkpoints, config, seed, device, &name)?;
            let proxy_model = load_proxy::<B::InnerBackend>(
                &checkpoints,
                config,
                pairs,
                1,
                seed,
                Aggregator::Mean,
                device,
                &name,
            )?;
            let lang = language(config, &name)?;
            let series = format!("bon p{pairs}");
            let mut logger = Logger::new(log, "overopt", &series);
            let points = best_of_n(
                &policy,
                &lang,
                &proxy_model,
                &LanguageGold::new(&lang),
                &bon_cfg.ns,
                bon_cfg.samples_per_prompt,
                bon_cfg.prompts,
                seed::derive(seed, &name),
                device,
            )
            .map_err(stage_error(&name))?;
            for p in &points {
                let m = BTreeMap::from([
                    ("n".to_string(), p.n as f64),
                    ("kl/ref".to_string(), p.kl),
                    (KEY_KL_D.to_string(), p.d),
                    (KEY_PROXY_MEAN.to_string(), p.proxy),
                    (KEY_GOLD_MEAN.to_string(), p.gold),
                ]);
                logger.log(p.n as u64, m).map_err(stage_error(&name))?;
            }
            Ok(points)
        })?;
        arms.push(OveroptArm {
            pairs,
            proxy,
            rl,
            bon,
        });
    }
    Ok(OveroptOutput { base, arms })
}

/// The fit of `law` to `(d, gold - offset)`, in the report's format, with its R^2 and the
/// `d` of its peak; `None` when it cannot be fitted.
pub(crate) fn fit_json(
    series: &str,
    law: OveroptLaw,
    d: &[f64],
    gold: &[f64],
    offset: f64,
) -> Option<(Value, f64, Option<f64>)> {
    let rel: Vec<f64> = gold.iter().map(|g| g - offset).collect();
    let f = fit(law, d, &rel, false).ok()?;
    let peak = f.peak().map(|p| p.d);
    let form = match law {
        OveroptLaw::Rl => "rl",
        OveroptLaw::BestOfN => "bon",
    };
    Some((
        json!({"series": series, "form": form, "alpha": f.alpha, "beta": f.beta,
               "r2": f.r_squared, "offset": offset, "peak_d": peak}),
        f.r_squared,
        peak,
    ))
}

/// Fits, peaks and detectors (`cfg.detectors`, replayed over each RL trace) of each
/// proxy's curves.
pub fn summarize(cfg: &OveroptExperiment, out: &OveroptOutput) -> Part {
    let mut figures = serde_json::Map::new();
    figures.insert("base_heldout_nll".into(), json!(out.base.heldout_nll));
    figures.insert("entropy_rate".into(), json!(out.base.entropy_rate));
    let mut fits = Vec::new();
    let mut rows = Vec::new();
    let mut detections = Vec::new();
    let mut det_rows = Vec::new();
    let mut peaks = Vec::new();
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
            &format!("bon p{}", arm.pairs),
            OveroptLaw::BestOfN,
            &bd,
            &bg,
            b0,
        );
        let peak = t.peak();
        let last = t.points.last();
        peaks.push((arm.pairs, peak));
        let key = format!("p{}", arm.pairs);
        figures.insert(
            key,
            json!({
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
                "rl_fit_r2": rl_fit.as_ref().map(|f| f.1),
                "rl_fit_peak_d": rl_fit.as_ref().and_then(|f| f.2),
                "bon_fit_r2": bon_fit.as_ref().map(|f| f.1),
                "bon_gold_max": bg.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            }),
        );
        rows.push(json!([
            arm.pairs,
            arm.proxy.heldout_acc,
            g0,
            peak.map(|p| p.value),
            peak.and_then(|p| p.interval)
                .map(|(lo, hi)| format!("[{lo:.3}, {hi:.3}]")),
            peak.map(|p| p.step),
            last.map(|p| p.gold),
            t.drop_fraction(),
            rl_fit.as_ref().map(|f| f.1),
            bon_fit.as_ref().map(|f| f.1),
        ]));
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
    // A proxy from more pairs should peak later (at larger d) or higher.
    let later_or_higher = peaks.windows(2).all(|w| match (w[0].1, w[1].1) {
        (Some(a), Some(b)) => b.step > a.step || b.value > a.value,
        _ => false,
    });
    if peaks.len() > 1 {
        figures.insert(
            "more_pairs_peak_later_or_higher".into(),
            json!(later_or_higher),
        );
    }
    let tables = vec![
        table(
            "Overoptimisation: RL (no KL) and best-of-n against each proxy",
            &[
                "pairs",
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
    Part {
        figures: Value::Object(figures),
        tables,
        fits,
        detections,
        ..Part::default()
    }
}
