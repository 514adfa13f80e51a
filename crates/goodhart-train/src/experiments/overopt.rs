//! Overoptimisation curves in the style of Gao, Schulman & Hilton (2022), on the
//! synthetic language.
//!
//! Stages:
//! - `lm/sft/s{seed}`: the base (SFT) policy, saved; shared with [`super::mitigations`];
//! - `lm/proxy/p{pairs}/k{members}/s{seed}`: proxy reward models trained on `pairs`
//!   gold-labelled pairs, saved; shared likewise;
//! - `overopt/rl/p{pairs}`: RL against that proxy (the `[rl]` algorithm, as configured:
//!   the preset has no KL), gold measured on every batch;
//! - `overopt/bon/p{pairs}`: best-of-n against that proxy from the base policy.
//!
//! The summary fits gold against `d = sqrt(KL(pi || pi_base))` with the RL law
//! `d (alpha - beta ln d)` and the best-of-n law `d (alpha - beta d)`, both relative to
//! the base policy's gold, reports where gold peaked and how far it fell, and runs the
//! gold-aware and proxy-only detectors over each RL trace (lead/lag to the gold peak).

use std::collections::BTreeMap;

use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_core::seed;
use goodhart_envs::language::Language;
use goodhart_metrics::{
    evaluate::{evaluate, GoldPeakRule, Run},
    overopt::{fit, OveroptLaw},
    step::{KEY_GOLD_MEAN, KEY_KL, KEY_KL_D, KEY_PROXY_MEAN},
};
use goodhart_policy::{
    checkpoint::{load_module, save_module},
    transformer::TransformerLm,
};
use goodhart_reward::Aggregator;

use super::{checkpoint_error, stage_error, table, Logger};
use crate::{
    best_of_n::{best_of_n, BonPoint},
    config::{ExperimentConfig, OveroptExperiment},
    policy_gradient::{self, LanguageGold, Proxy, RlConfig},
    reward_model::{train_proxy, train_proxy_ensemble, ProxyConfig, ProxyReport},
    runner::{Result, Runner},
    sft::{train_base, SftReport},
};

/// One point of an RL trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TracePoint {
    /// RL step.
    pub step: u64,
    /// `sqrt(KL(pi || pi_base))`.
    pub d: f64,
    /// Mean proxy reward of the batch.
    pub proxy: f64,
    /// Mean gold reward of the same samples.
    pub gold: f64,
    /// Every other number logged at the step (entropy, length, ensemble disagreement,
    /// ...): with the fields above, what the detectors read when replayed over the trace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// An RL run's trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trace {
    /// Its series name in `metrics.jsonl`.
    pub series: String,
    /// The points, in step order.
    pub points: Vec<TracePoint>,
}

impl Trace {
    /// The step with the highest gold, and that gold.
    pub fn peak(&self) -> Option<&TracePoint> {
        self.points
            .iter()
            .filter(|p| p.gold.is_finite())
            .max_by(|a, b| a.gold.total_cmp(&b.gold))
    }

    /// `(peak - final) / (peak - initial)`: the fraction of the gold gained that was lost
    /// again (0 when gold never rose).
    pub fn drop_fraction(&self) -> Option<f64> {
        let (first, last, peak) = (self.points.first()?, self.points.last()?, self.peak()?);
        let gain = peak.gold - first.gold;
        Some(if gain > 0.0 {
            (peak.gold - last.gold) / gain
        } else {
            0.0
        })
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

fn language(config: &ExperimentConfig, stage: &str) -> Result<Language> {
    Language::new(config.language.clone()).map_err(stage_error(stage))
}

/// Stage `lm/sft/s{seed}`: trains and saves the base policy.
pub(crate) fn base_policy<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    seed: u64,
    device: &B::Device,
) -> Result<SftReport> {
    let name = format!("lm/sft/s{seed}");
    let path = runner.artifact(&format!("lm/s{seed}/base"))?;
    runner.stage(&name, |_| {
        let lang = language(config, &name)?;
        let (model, report) =
            train_base::<B>(&lang, &config.sft, seed, device).map_err(stage_error(&name))?;
        save_module(&model, &path).map_err(checkpoint_error(&name))?;
        Ok(report)
    })
}

/// Loads the base policy saved by [`base_policy`].
pub(crate) fn load_base<B: Backend>(
    runner: &Runner,
    config: &ExperimentConfig,
    seed: u64,
    device: &B::Device,
    stage: &str,
) -> Result<TransformerLm<B>> {
    let lang = language(config, stage)?;
    let template = config
        .sft
        .model(&lang)
        .init::<B>(device)
        .map_err(stage_error(stage))?;
    let path = runner.artifact(&format!("lm/s{seed}/base"))?;
    load_module(template, &path, device).map_err(checkpoint_error(stage))
}

fn proxy_path(
    runner: &Runner,
    pairs: usize,
    k: usize,
    seed: u64,
    member: usize,
) -> Result<std::path::PathBuf> {
    runner.artifact(&format!("lm/s{seed}/proxy-p{pairs}-k{k}-m{member}"))
}

/// Stage `lm/proxy/p{pairs}/k{k}/s{seed}`: trains and saves `k` proxy reward models on
/// `pairs` pairs (one plain model when `k = 1`).
pub(crate) fn proxies<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    pairs: usize,
    k: usize,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<ProxyReport>> {
    let name = format!("lm/proxy/p{pairs}/k{k}/s{seed}");
    let paths = (0..k)
        .map(|m| proxy_path(runner, pairs, k, seed, m))
        .collect::<Result<Vec<_>>>()?;
    runner.stage(&name, |_| {
        let lang = language(config, &name)?;
        let cfg = ProxyConfig {
            pairs,
            ..config.proxy.clone()
        };
        let members = if k == 1 {
            vec![train_proxy::<B>(&lang, &cfg, seed, device).map_err(stage_error(&name))?]
        } else {
            train_proxy_ensemble::<B>(&lang, &cfg, k, seed, device).map_err(stage_error(&name))?
        };
        let mut reports = Vec::with_capacity(k);
        for ((model, report), path) in members.into_iter().zip(&paths) {
            model.save(path).map_err(stage_error(&name))?;
            reports.push(report);
        }
        Ok(reports)
    })
}

/// Loads the proxies saved by [`proxies`] as one (aggregated) proxy.
pub(crate) fn load_proxy<B: Backend>(
    runner: &Runner,
    config: &ExperimentConfig,
    pairs: usize,
    k: usize,
    seed: u64,
    aggregation: Aggregator,
    device: &B::Device,
    stage: &str,
) -> Result<Proxy<B>> {
    let lang = language(config, stage)?;
    let members = (0..k)
        .map(|m| {
            let template = config
                .proxy
                .model(&lang)
                .init::<B>(device)
                .map_err(stage_error(stage))?;
            let path = proxy_path(runner, pairs, k, seed, m)?.with_extension("mpk");
            template.load(&path, device).map_err(stage_error(stage))
        })
        .collect::<Result<Vec<_>>>()?;
    policy_gradient::proxy(members, aggregation).map_err(stage_error(stage))
}

/// A stage that runs RL from the base policy against a proxy and returns its trace.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rl_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    name: &str,
    experiment: &str,
    series: &str,
    pg: &RlConfig,
    seed: u64,
    proxy: (usize, usize, Aggregator),
    device: &B::Device,
) -> Result<Trace> {
    let (pairs, k, aggregation) = proxy;
    let policy = load_base::<B>(runner, config, seed, device, name)?;
    let reference = load_base::<B::InnerBackend>(runner, config, seed, device, name)?;
    let proxy =
        load_proxy::<B::InnerBackend>(runner, config, pairs, k, seed, aggregation, device, name)?;
    runner.stage(name, |log| {
        let lang = language(config, name)?;
        let mut logger = Logger::new(log, experiment, series);
        let mut points = Vec::new();
        policy_gradient::train(
            pg,
            &lang,
            policy,
            &reference,
            &proxy,
            &LanguageGold::new(&lang),
            seed::derive(seed, name),
            device,
            &mut |line: &policy_gradient::StepLine| {
                let get = |k: &str| line.get(k);
                points.push(TracePoint {
                    step: line.step as u64,
                    d: get(KEY_KL_D),
                    proxy: get(KEY_PROXY_MEAN),
                    gold: get(KEY_GOLD_MEAN),
                    metrics: line
                        .metrics
                        .iter()
                        .filter(|(k, _)| {
                            ![KEY_KL_D, KEY_PROXY_MEAN, KEY_GOLD_MEAN].contains(&k.as_str())
                        })
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                });
                logger.samples(&line.samples)?;
                logger.log(
                    line.step as u64,
                    line.metrics
                        .iter()
                        .map(|(k, v)| (k.clone(), json!(v)))
                        .collect(),
                )
            },
        )
        .map_err(stage_error(name))?;
        Ok(Trace {
            series: series.to_string(),
            points,
        })
    })
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
            device,
        )?;
        let name = format!("overopt/bon/p{pairs}");
        let policy = load_base::<B::InnerBackend>(runner, config, seed, device, &name)?;
        let proxy_model = load_proxy::<B::InnerBackend>(
            runner,
            config,
            pairs,
            1,
            seed,
            Aggregator::Mean,
            device,
            &name,
        )?;
        let bon_cfg = &cfg.best_of_n;
        let bon = runner.stage(&name, |log| {
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
                let mut m = serde_json::Map::new();
                m.insert("n".into(), json!(p.n));
                m.insert("kl/ref".into(), json!(p.kl));
                m.insert(KEY_KL_D.into(), json!(p.d));
                m.insert(KEY_PROXY_MEAN.into(), json!(p.proxy));
                m.insert(KEY_GOLD_MEAN.into(), json!(p.gold));
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

/// What [`summarize`] gives to `summary.json`.
pub struct OveroptSummary {
    /// Scalar figures, per proxy.
    pub figures: Value,
    /// Tables.
    pub tables: Vec<Value>,
    /// Fits, in the report's format.
    pub fits: Vec<Value>,
    /// Detector firings, in the report's format.
    pub detections: Vec<Value>,
}

fn fit_json(
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
pub fn summarize(cfg: &OveroptExperiment, out: &OveroptOutput) -> OveroptSummary {
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
                "rl_gold_peak": peak.map(|p| p.gold),
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
            peak.map(|p| p.gold),
            peak.map(|p| p.step),
            last.map(|p| p.gold),
            t.drop_fraction(),
            rl_fit.as_ref().map(|f| f.1),
            bon_fit.as_ref().map(|f| f.1),
        ]));
        fits.extend(rl_fit.map(|f| f.0));
        fits.extend(bon_fit.map(|f| f.0));
        // Detectors, replayed over the trace as they would run online.
        let run = Run {
            name: t.series.clone(),
            steps: t
                .points
                .iter()
                .map(|p| {
                    let mut m = p.metrics.clone();
                    m.insert(KEY_PROXY_MEAN.into(), p.proxy);
                    m.insert(KEY_GOLD_MEAN.into(), p.gold);
                    m.insert(KEY_KL_D.into(), p.d);
                    m.entry(KEY_KL.into()).or_insert(p.d * p.d);
                    (p.step, m)
                })
                .collect(),
        };
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
        (Some(a), Some(b)) => b.step > a.step || b.gold > a.gold,
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
                "gold peak",
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
    OveroptSummary {
        figures: Value::Object(figures),
        tables,
        fits,
        detections,
    }
}
