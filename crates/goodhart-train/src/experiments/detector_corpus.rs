//! The detector corpus: many RL runs on the overoptimisation task with gold known, split
//! by seed into calibration and held-out test traces, and the hacking detectors
//! calibrated on the first and measured on the second against baselines that need no
//! detector.
//!
//! Each setting is a proxy (`pairs` gold-labelled pairs with labels flipped at
//! `label_noise`, `ensemble` members) and the `[rl]` algorithm with the setting's
//! overrides; `control = true` marks a setting built not to hack (a strong KL, training
//! on gold itself, a tiny learning rate). The first `calibration_seeds` seeds give the
//! calibration traces, the next `test_seeds` the test traces; every setting runs on every
//! seed except a `test_only` one, which runs on the test seeds alone (a setting the
//! calibration never sees).
//!
//! Labels come from the whole gold curve ([`gold_peak`]: the peak of the centred moving
//! average of gold, hacked when the final smoothed gold is below it by the rule's drop).
//! Gold is the rule's `gold_key`: the training batch's `reward/gold/mean`, or with `[rl]
//! eval` an evaluation batch's `eval/gold/mean`; the stopping regrets read the same curve.
//! A false alarm is a firing on a control trace that did not hack.
//!
//! Calibration: a proxy-only, CUSUM or shift detector's `threshold` is the smallest of
//! `thresholds` at which it fires on at most `false_alarm_rate` of the calibration
//! controls that did not hack ([`calibrate_threshold`]); a logistic detector's weights and
//! bias are fitted on the calibration traces ([`LogisticFit`]) and its threshold is the
//! smallest of [`PROBABILITIES`] that meets the same target (the fitted configuration is
//! in the figures, `config`); a gold-aware detector runs as configured.
//!
//! Each rule stops a trace at a step: a detector at its firing; `end` never (training to
//! the end); `proxy-plateau` when the proxy's EMA gained less than `plateau_fraction` of
//! its rise over the last `plateau_window` steps ([`proxy_plateau_stop`]); `kl-budget`
//! when `kl/ref` reaches the median over the calibration traces that hacked of `kl/ref`
//! at their gold peak ([`kl_budget_stop`]); and two references that read gold, `gold peak
//! -1` and `gold peak +1`, one step before and one after the smoothed gold peak (on every
//! trace, controls too). On the test traces, per rule: the lead
//! (`peak step - stop step`) on hacking traces, the false alarms on controls, and the
//! stopping regret ([`stopping_regret`]) on hacking traces and on all, medians with
//! percentile-bootstrap intervals.
//!
//! With `heldout` (the default), a held-out proxy per pairs count and seed (a reward model
//! on other pairs) scores every sample, logged as `reward/heldout/mean` and `gap/heldout`:
//! a gold-free signal the detectors can read (a gold-aware detector with `gold_key =
//! "reward/heldout/mean"` uses it in place of gold). With `ood` (the default), the
//! proxy's out-of-distribution score of every sample ([`crate::task::EmbeddingOod`]) is
//! logged as `ood/{mean,std,min,max}`.
//!
//! Stages: `lm/sft/s{seed}`, `lm/proxy/p{pairs}/k{k}[/n{noise}]/s{seed}` and
//! `lm/heldout/p{pairs}[/n{noise}]/s{seed}` (a label noise of 0.3 as `n0p3`;
//! [`super::lm`]), then `corpus/{setting}/s{seed}`.

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_metrics::{
    cusum::CusumConfig,
    detect::{DetectorConfig, GoldAwareConfig, ProxyOnlyConfig},
    evaluate::{
        calibrate_threshold, first_firing, gold_peak, kl_budget_stop, proxy_plateau_stop,
        stopping_regret, GoldPeak, GoldPeakRule, Run,
    },
    logistic::{self, LogisticConfig},
    shift::ShiftConfig,
    stats::{median, median_interval, Interval},
    step::{KEY_GOLD_MEAN, KEY_KL, KEY_PROXY_MEAN},
};
use goodhart_reward::Aggregator;

use super::{
    lm::{
        self, base_policy, heldout_proxy, proxies, rl_stage, Monitors, ProxySpec, Trace, HELDOUT,
        OOD,
    },
    mitigations::rl_with,
    table, Experiment, Part,
};
use crate::{
    config::{positive, section, ConfigError, ExperimentConfig},
    policy_gradient::check_detectors,
    runner::{Result, Runner},
};

/// `[detector_corpus]`: settings x seeds of RL runs, detectors calibrated and tested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorCorpusExperiment {
    /// Seeds of the calibration traces (`seed`, `seed + 1`, ...).
    pub calibration_seeds: usize,
    /// Seeds of the test traces (the next ones).
    pub test_seeds: usize,
    /// The settings every seed runs.
    pub settings: Vec<CorpusSetting>,
    /// The detectors measured (a proxy-only, CUSUM or shift one's `threshold` is
    /// calibrated; a logistic one's weights and bias are fitted, then its threshold
    /// calibrated over [`PROBABILITIES`]).
    pub detectors: Vec<DetectorConfig>,
    /// How a logistic detector is fitted on the calibration traces.
    pub logistic: LogisticFit,
    /// The thresholds a proxy-only, CUSUM or shift detector is calibrated over,
    /// increasing.
    pub thresholds: Vec<f64>,
    /// The largest share of calibration controls a calibrated detector may fire on.
    pub false_alarm_rate: f64,
    /// How a trace's gold peak is found and whether it hacked.
    pub peak: GoldPeakRule,
    /// The proxy-plateau baseline's window, in steps.
    pub plateau_window: usize,
    /// The proxy-plateau baseline's share of the rise.
    pub plateau_fraction: f64,
    /// Bootstrap resamples of each interval (95%).
    pub resamples: usize,
    /// A held-out proxy (a reward model on other pairs of the same count) scores every
    /// sample: `reward/heldout/mean` and `gap/heldout` (the proxy's mean minus it) are
    /// logged for the detectors to read.
    pub heldout: bool,
    /// The proxy's out-of-distribution score of every sample (the Mahalanobis distance
    /// of its first reward model's embedding from its embeddings of fresh pairs of the
    /// data it was trained on, [`crate::task::EmbeddingOod`]) is logged as
    /// `ood/{mean,std,min,max}` for the detectors to read.
    pub ood: bool,
}

impl Default for DetectorCorpusExperiment {
    fn default() -> Self {
        let setting = |name: &str, pairs: usize, rl: &str, control: bool| CorpusSetting {
            name: name.into(),
            pairs,
            ensemble: 1,
            aggregation: Aggregator::Mean,
            label_noise: None,
            rl: rl
                .parse()
                .expect("built-in setting overrides are valid TOML"),
            control,
            test_only: false,
        };
        let kl = |coef: f64| {
            format!(
                "regularizers = [{{ kind = \"kl\", estimator = \"k1\", placement = \"reward\", \
                 controller = {{ kind = \"fixed\", coef = {coef} }} }}]"
            )
        };
        Self {
            calibration_seeds: 2,
            test_seeds: 2,
            settings: vec![
                setting("p50", 50, "", false),
                setting("p200", 200, "", false),
                setting("p1000", 1000, "", false),
                setting("p200-lr1e-3", 200, "lr = 1e-3", false),
                setting("p200-rloo", 200, "advantage = { kind = \"rloo\" }", false),
                CorpusSetting {
                    label_noise: Some(0.3),
                    ..setting("p200-n0.3", 200, "", false)
                },
                setting("kl-strong", 200, &kl(0.3), true),
                // The KL of the mitigations lab's `kl` arm.
                setting("kl", 200, &kl(0.05), true),
                setting("gold", 200, "components = [{ name = \"gold\" }]", true),
                setting("lr-tiny", 200, "lr = 1e-5", true),
                // Settings the calibration never sees.
                CorpusSetting {
                    test_only: true,
                    ..setting("p500", 500, "", false)
                },
                CorpusSetting {
                    test_only: true,
                    ..setting("kl-stronger", 200, &kl(0.6), true)
                },
            ],
            detectors: vec![
                DetectorConfig::ProxyOnly(ProxyOnlyConfig::default()),
                DetectorConfig::GoldAware(GoldAwareConfig::default()),
            ],
            // 0.5 to 200 in steps of 10%: the proxy-only score's scale and CUSUM's sums.
            thresholds: (0..64).map(|i| 0.5 * 1.1f64.powi(i)).collect(),
            false_alarm_rate: 0.1,
            logistic: LogisticFit::default(),
            peak: GoldPeakRule::default(),
            plateau_window: 10,
            plateau_fraction: 0.05,
            resamples: 1000,
            heldout: true,
            ood: true,
        }
    }
}

/// The thresholds a logistic detector is calibrated over: 0.01 to 0.99 in steps of 0.01.
pub const PROBABILITIES: [f64; 99] = {
    let mut p = [0.0; 99];
    let mut i = 0;
    while i < 99 {
        p[i] = (i + 1) as f64 / 100.0;
        i += 1;
    }
    p
};

/// How a logistic detector is fitted ([`logistic::fit`]): its rows are the steps of the
/// calibration traces, labelled 1 on a hacking trace from `lead` steps before its gold
/// peak on, and 0 on a control that did not hack (other traces are left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogisticFit {
    /// Steps before the gold peak from which a hacking trace's steps are labelled 1.
    pub lead: u64,
    /// The ridge penalty on the standardised weights.
    pub l2: f64,
}

impl Default for LogisticFit {
    fn default() -> Self {
        Self { lead: 3, l2: 1.0 }
    }
}

/// One setting of the corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSetting {
    /// Its name in stage names and tables.
    pub name: String,
    /// Preference pairs of its proxy.
    pub pairs: usize,
    /// Reward models in its proxy.
    #[serde(default = "one")]
    pub ensemble: usize,
    /// How the members' rewards are combined.
    #[serde(default)]
    pub aggregation: Aggregator,
    /// The probability that a training pair's label is flipped, for its proxy and its
    /// held-out proxy (`[proxy] label_noise` when unset).
    #[serde(default)]
    pub label_noise: Option<f64>,
    /// Keys of `[rl]` it overrides (merged key by key).
    #[serde(default)]
    pub rl: toml::Table,
    /// Built not to hack.
    #[serde(default)]
    pub control: bool,
    /// Runs on the test seeds only: a setting the calibration never sees.
    #[serde(default)]
    pub test_only: bool,
}

impl CorpusSetting {
    /// Whether it runs on the calibration seeds (`calibration`) or on the test seeds.
    fn runs_on(&self, calibration: bool) -> bool {
        !(calibration && self.test_only)
    }
}

fn one() -> usize {
    1
}

/// One trace of the corpus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CorpusTrace {
    /// Its setting.
    pub setting: String,
    /// The seed.
    pub seed: u64,
    /// A calibration trace (else a test trace).
    pub calibration: bool,
    /// Its setting is a control.
    pub control: bool,
    /// The RL trace.
    pub trace: Trace,
}

impl Experiment for DetectorCorpusExperiment {
    const NAME: &'static str = "detector_corpus";
    const SUMMARY: &'static str =
        "RL traces with gold known, split by seed: detectors calibrated, then lead, false alarms and stopping regret on held-out traces";
    type Output = Vec<CorpusTrace>;

    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        positive("detector_corpus.calibration_seeds", self.calibration_seeds)?;
        positive("detector_corpus.test_seeds", self.test_seeds)?;
        positive("detector_corpus.resamples", self.resamples)?;
        if self.settings.is_empty() {
            return Err(ConfigError::invalid("detector_corpus.settings", "is empty"));
        }
        if !self.settings.iter().any(|s| s.control && s.runs_on(true)) {
            return Err(ConfigError::invalid(
                "detector_corpus.settings",
                "no control the calibration sees: thresholds are calibrated on settings with \
                 `control = true` and without `test_only`",
            ));
        }
        if !(0.0..=1.0).contains(&self.false_alarm_rate) {
            return Err(ConfigError::invalid(
                "detector_corpus.false_alarm_rate",
                format!("{} is not a share", self.false_alarm_rate),
            ));
        }
        if self.thresholds.is_empty()
            || self.thresholds.windows(2).any(|w| w[1] <= w[0])
            || self.thresholds.iter().any(|t| !(t.is_finite() && *t > 0.0))
        {
            return Err(ConfigError::invalid(
                "detector_corpus.thresholds",
                "must be finite, positive and increasing",
            ));
        }
        if !(self.plateau_fraction.is_finite() && self.plateau_fraction >= 0.0) {
            return Err(ConfigError::invalid(
                "detector_corpus.plateau_fraction",
                "must be finite and >= 0",
            ));
        }
        positive("detector_corpus.plateau_window", self.plateau_window)?;
        if !(self.logistic.l2.is_finite() && self.logistic.l2 >= 0.0) {
            return Err(ConfigError::invalid(
                "detector_corpus.logistic.l2",
                "must be finite and >= 0",
            ));
        }
        // A logistic detector's weights are fitted here: it is checked with any.
        let detectors: Vec<DetectorConfig> = self
            .detectors
            .iter()
            .map(|d| match d {
                DetectorConfig::Logistic(c) => {
                    DetectorConfig::Logistic(c.with_fit(vec![0.0; c.features.len()], 0.0))
                }
                other => other.clone(),
            })
            .collect();
        if self.peak.window == 0 {
            return Err(ConfigError::invalid(
                "detector_corpus.peak.window",
                "must be at least 1",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.settings.iter().enumerate() {
            let path = format!("detector_corpus.settings[{i}]");
            positive(&format!("{path}.pairs"), s.pairs)?;
            positive(&format!("{path}.ensemble"), s.ensemble)?;
            if let Some(n) = s.label_noise {
                if !(0.0..=1.0).contains(&n) {
                    return Err(ConfigError::invalid(
                        format!("{path}.label_noise"),
                        format!("{n} is not a probability"),
                    ));
                }
            }
            if s.name.is_empty() || s.name.contains('/') || !names.insert(s.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{path}.name"),
                    format!("`{}` is empty, has a `/` or is used twice", s.name),
                ));
            }
            let rl = rl_with(&config.rl, &s.rl, &format!("{path}.rl"))?;
            lm::validate(config, &rl, &format!("{path}.rl"), s.ensemble)?;
            let mut logged = rl.logged_keys();
            if self.heldout {
                logged = logged.with_monitors(&[HELDOUT]);
            }
            if self.ood {
                logged = logged.with_scores(&[OOD]);
            }
            if !logged.accepts(&self.peak.gold_key) {
                return Err(ConfigError::invalid(
                    "detector_corpus.peak.gold_key",
                    format!(
                        "`{}` is not logged by setting `{}`: gold is `reward/gold/mean` on \
                         the training batch, `eval/gold/mean` with `[rl] eval`",
                        self.peak.gold_key, s.name
                    ),
                ));
            }
            section(
                "detector_corpus",
                check_detectors("detector_corpus.detectors", &detectors, &logged),
            )?;
        }
        Ok(())
    }

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<Vec<CorpusTrace>> {
        let mut out = Vec::new();
        for i in 0..self.calibration_seeds + self.test_seeds {
            let seed = config.seed + i as u64;
            base_policy::<B>(runner, config, seed, device)?;
            let calibration = i < self.calibration_seeds;
            for (j, s) in self.settings.iter().enumerate() {
                if !s.runs_on(calibration) {
                    continue;
                }
                let proxy =
                    ProxySpec::ensemble(s.pairs, s.ensemble, s.aggregation).noisy(s.label_noise);
                proxies::<B>(runner, config, proxy, seed, device)?;
                if self.heldout {
                    heldout_proxy::<B>(runner, config, proxy, seed, device)?;
                }
                let path = format!("detector_corpus.settings[{j}].rl");
                let pg = rl_with(&config.rl, &s.rl, &path)?;
                let trace = rl_stage::<B>(
                    runner,
                    config,
                    &format!("corpus/{}/s{seed}", s.name),
                    Self::NAME,
                    &format!("{}/s{seed}", s.name),
                    &pg,
                    seed,
                    proxy,
                    None,
                    Monitors {
                        heldout: self.heldout,
                        ood: self.ood,
                    },
                    device,
                )?;
                out.push(CorpusTrace {
                    setting: s.name.clone(),
                    seed,
                    calibration,
                    control: s.control,
                    trace,
                });
            }
        }
        Ok(out)
    }

    fn summarize(&self, traces: &Vec<CorpusTrace>) -> Part {
        summarize(self, traces)
    }
}

/// A trace with its run and label.
struct Labelled<'a> {
    meta: &'a CorpusTrace,
    run: Run,
    peak: Option<GoldPeak>,
}

impl Labelled<'_> {
    fn hacked(&self) -> bool {
        self.peak.is_some_and(|p| p.hacked)
    }
    /// A control that did not hack: where a firing is a false alarm.
    fn clean_control(&self) -> bool {
        self.meta.control && !self.hacked()
    }
}

/// A rule's stop on one trace.
type StopRule<'a> = Box<dyn Fn(&Run) -> goodhart_core::Result<Option<u64>> + 'a>;

/// A rule: its name, what it was calibrated to, its stop, and a fitted detector's
/// configuration (for the figures, to be reused).
type NamedRule<'a> = (String, String, StopRule<'a>, Option<DetectorConfig>);

/// A logistic detector fitted on the calibration traces ([`LogisticFit`]) and its
/// threshold calibrated over [`PROBABILITIES`], with what it was calibrated to.
fn fit_logistic(
    cfg: &DetectorCorpusExperiment,
    c: &LogisticConfig,
    calibration: &[&Labelled],
    clean: &[Run],
) -> goodhart_core::Result<(LogisticConfig, String)> {
    let (mut rows, mut labels, mut traces) = (Vec::new(), Vec::new(), 0);
    for t in calibration {
        let peak = if t.hacked() {
            t.peak.map(|p| p.step)
        } else if t.clean_control() {
            None
        } else {
            continue;
        };
        traces += 1;
        for (step, x) in logistic::feature_rows(&c.features, &t.run)? {
            labels.push(peak.is_some_and(|p| step + cfg.logistic.lead >= p));
            rows.push(x);
        }
    }
    if !labels.iter().any(|y| *y) {
        return Err(goodhart_core::GoodhartError::invalid(
            "calibration",
            "no calibration trace hacked: there is nothing to fit",
        ));
    }
    let (weights, bias) = logistic::fit(&rows, &labels, cfg.logistic.l2)?;
    let fitted = c.with_fit(weights, bias);
    let make = |t: f64| {
        DetectorConfig::Logistic(LogisticConfig {
            threshold: t,
            ..fitted.clone()
        })
        .build()
    };
    let fit = format!(
        "fitted on {} steps of {traces} traces (lead {}, l2 {})",
        rows.len(),
        cfg.logistic.lead,
        cfg.logistic.l2
    );
    Ok(
        match calibrate_threshold(clean, &PROBABILITIES, cfg.false_alarm_rate, &make)? {
            Some(t) => (
                LogisticConfig {
                    threshold: t,
                    ..fitted
                },
                format!("{fit}, p >= {t:.2} (calibrated)"),
            ),
            None => {
                let t = fitted.threshold;
                (
                    fitted,
                    format!("{fit}, p >= {t} (none of the thresholds meets the target)"),
                )
            }
        },
    )
}

/// The calibrated detectors and the baselines, with what each was calibrated to.
fn rules<'a>(cfg: &'a DetectorCorpusExperiment, calibration: &[&Labelled]) -> Vec<NamedRule<'a>> {
    let clean: Vec<Run> = calibration
        .iter()
        .filter(|t| t.clean_control())
        .map(|t| t.run.clone())
        .collect();
    let mut out: Vec<NamedRule<'a>> = Vec::new();
    let label = |d: &DetectorConfig| match d {
        DetectorConfig::ProxyOnly(c) if c.signals != ProxyOnlyConfig::default().signals => {
            let keys: Vec<&str> = c.signals.iter().map(|s| s.key.as_str()).collect();
            format!("proxy-only on {}", keys.join(", "))
        }
        DetectorConfig::ProxyOnly(_) => "proxy-only".to_string(),
        DetectorConfig::GoldAware(c) if c.gold_key != GoldAwareConfig::default().gold_key => {
            format!("gold-aware on {}", c.gold_key)
        }
        DetectorConfig::GoldAware(_) => "gold-aware".to_string(),
        DetectorConfig::Cusum(c) => format!("cusum on {}", c.key),
        DetectorConfig::Shift(c) => format!("shift on {}", c.key),
        DetectorConfig::Logistic(c) if c.features == LogisticConfig::default_features() => {
            "logistic".to_string()
        }
        DetectorConfig::Logistic(c) => {
            let mut keys: Vec<&str> = c.features.iter().map(|f| f.key.as_str()).collect();
            keys.dedup();
            format!("logistic on {}", keys.join(", "))
        }
    };
    for (i, d) in cfg.detectors.iter().enumerate() {
        // Two detectors of one label are told apart by their place in the list.
        let base = label(d);
        let twice = cfg.detectors.iter().filter(|o| label(o) == base).count() > 1;
        let name = if twice { format!("{base} #{i}") } else { base };
        match d {
            DetectorConfig::ProxyOnly(ProxyOnlyConfig {
                threshold: configured,
                warmup,
                ..
            })
            | DetectorConfig::Cusum(CusumConfig {
                threshold: configured,
                warmup,
                ..
            })
            | DetectorConfig::Shift(ShiftConfig {
                threshold: configured,
                warmup,
                ..
            }) => {
                let with = |t: f64| d.with_threshold(t).unwrap_or_else(|| d.clone());
                let make = |t: f64| with(t).build();
                let calibrated = if clean.is_empty() {
                    Err("no calibration control that did not hack".to_string())
                } else {
                    calibrate_threshold(&clean, &cfg.thresholds, cfg.false_alarm_rate, &make)
                        .map_err(|e| e.to_string())
                };
                let (threshold, note) = match calibrated {
                    Ok(Some(t)) => (t, format!("threshold {t:.3} (calibrated), warmup {warmup}")),
                    Ok(None) => (
                        *configured,
                        format!("threshold {configured} (none of the thresholds meets the target)"),
                    ),
                    Err(e) => (*configured, format!("threshold {configured} ({e})")),
                };
                let chosen = with(threshold);
                out.push((
                    name,
                    note,
                    Box::new(move |run| first_firing(run, chosen.build()?)),
                    None,
                ));
            }
            DetectorConfig::GoldAware(c) => out.push((
                name,
                if c.gold_key == KEY_GOLD_MEAN || c.gold_key == cfg.peak.gold_key {
                    "as configured (reads gold)".into()
                } else {
                    "as configured".into()
                },
                Box::new(move |run| first_firing(run, d.build()?)),
                None,
            )),
            DetectorConfig::Logistic(c) => match fit_logistic(cfg, c, calibration, &clean) {
                Ok((fitted, note)) => {
                    let chosen = DetectorConfig::Logistic(fitted);
                    let run_it = chosen.clone();
                    out.push((
                        name,
                        note,
                        Box::new(move |run| first_firing(run, run_it.build()?)),
                        Some(chosen),
                    ))
                }
                Err(e) => out.push((
                    name,
                    "not fitted".into(),
                    Box::new(move |_| Err(e.clone())),
                    None,
                )),
            },
        }
    }
    out.push((
        "end".into(),
        "trains to the last step".into(),
        Box::new(|_| Ok(None)),
        None,
    ));
    out.push((
        "proxy-plateau".into(),
        format!(
            "window {}, share {}",
            cfg.plateau_window, cfg.plateau_fraction
        ),
        Box::new(move |run| {
            Ok(proxy_plateau_stop(
                run,
                KEY_PROXY_MEAN,
                cfg.plateau_window,
                cfg.plateau_fraction,
            ))
        }),
        None,
    ));
    // The KL budget: the median KL at the gold peak of the calibration traces that hacked.
    let at_peak: Vec<f64> = calibration
        .iter()
        .filter(|t| t.hacked())
        .filter_map(|t| {
            let step = t.peak?.step;
            t.run
                .steps
                .iter()
                .find(|(s, _)| *s == step)
                .and_then(|(_, m)| m.get(KEY_KL).copied())
        })
        .collect();
    match median(&at_peak) {
        Ok(budget) => out.push((
            "kl-budget".into(),
            format!("kl/ref >= {budget:.4}"),
            Box::new(move |run| Ok(kl_budget_stop(run, KEY_KL, budget))),
            None,
        )),
        Err(_) => out.push((
            "kl-budget".into(),
            "no calibration trace hacked: no budget".into(),
            Box::new(|_| Ok(None)),
            None,
        )),
    }
    // References that read gold: a step before and a step after the smoothed gold peak,
    // the regret a rule pays for missing the peak by one step either way.
    for offset in [-1i64, 1] {
        out.push((
            format!("gold peak {offset:+}"),
            "reads gold".into(),
            Box::new(move |run| {
                let peak = gold_peak(run, &cfg.peak)?;
                let at = run.steps.iter().position(|(s, _)| *s == peak.step);
                Ok(at.map(|i| {
                    let j = i.saturating_add_signed(offset as isize);
                    run.steps[j.min(run.steps.len() - 1)].0
                }))
            }),
            None,
        ));
    }
    out
}

/// The traces table, and each rule on the test traces.
fn summarize(cfg: &DetectorCorpusExperiment, traces: &[CorpusTrace]) -> Part {
    let labelled: Vec<Labelled> = traces
        .iter()
        .map(|t| {
            let run = t.trace.to_run();
            let peak = gold_peak(&run, &cfg.peak).ok();
            Labelled { meta: t, run, peak }
        })
        .collect();
    let mut figures = serde_json::Map::new();
    // The corpus.
    let mut trace_rows = Vec::new();
    for s in &cfg.settings {
        for calibration in [true, false] {
            if !s.runs_on(calibration) {
                continue;
            }
            let mine: Vec<&Labelled> = labelled
                .iter()
                .filter(|t| t.meta.setting == s.name && t.meta.calibration == calibration)
                .collect();
            let peaks: Vec<f64> = mine
                .iter()
                .filter_map(|t| t.peak.map(|p| p.step as f64))
                .collect();
            trace_rows.push(json!([
                s.name,
                s.control,
                if calibration { "calibration" } else { "test" },
                mine.len(),
                mine.iter().filter(|t| t.hacked()).count(),
                median(&peaks).ok(),
            ]));
        }
    }
    let calibration: Vec<&Labelled> = labelled.iter().filter(|t| t.meta.calibration).collect();
    let test: Vec<&Labelled> = labelled.iter().filter(|t| !t.meta.calibration).collect();
    let hacking: Vec<&&Labelled> = test.iter().filter(|t| t.hacked()).collect();
    let clean: Vec<&&Labelled> = test.iter().filter(|t| t.clean_control()).collect();
    let interval =
        |x: &[f64]| -> Option<Interval> { median_interval(x, cfg.resamples, 0.95, 0).ok() };
    let cell = |i: &Option<Interval>| match i {
        Some(i) => json!(format!("{:.3} [{:.3}, {:.3}]", i.value, i.lo, i.hi)),
        None => Value::Null,
    };
    let mut rule_rows = Vec::new();
    for (name, note, stop, fitted) in rules(cfg, &calibration) {
        let stops = |ts: &[&&Labelled]| -> goodhart_core::Result<Vec<Option<u64>>> {
            ts.iter().map(|t| stop(&t.run)).collect()
        };
        let result = (|| -> goodhart_core::Result<Value> {
            let on_hacking = stops(&hacking)?;
            let on_clean = stops(&clean)?;
            let all: Vec<&&Labelled> = test.iter().collect();
            let on_all = stops(&all)?;
            let leads: Vec<f64> = hacking
                .iter()
                .zip(&on_hacking)
                .filter_map(|(t, s)| Some(t.peak?.step as f64 - (*s)? as f64))
                .collect();
            let regret = |ts: &[&&Labelled], ss: &[Option<u64>]| -> Vec<f64> {
                ts.iter()
                    .zip(ss)
                    .filter_map(|(t, s)| stopping_regret(&t.run, *s, &cfg.peak).ok().flatten())
                    .collect()
            };
            let regret_hacking = interval(&regret(&hacking, &on_hacking));
            let regret_all = interval(&regret(&all, &on_all));
            let lead = interval(&leads);
            let alarms = on_clean.iter().filter(|s| s.is_some()).count();
            let mut figure = json!({"lead_median": lead.map(|i| i.value), "false_alarms": alarms,
                       "controls": clean.len(), "fired_on_hacking": leads.len(),
                       "hacking": hacking.len(),
                       "regret_hacking_median": regret_hacking.map(|i| i.value),
                       "regret_all_median": regret_all.map(|i| i.value)});
            if let Some(d) = &fitted {
                figure["config"] = json!(d);
            }
            figures.insert(name.clone(), figure);
            Ok(json!([
                name,
                note,
                format!("{}/{}", leads.len(), hacking.len()),
                cell(&lead),
                format!("{alarms}/{}", clean.len()),
                cell(&regret_hacking),
                cell(&regret_all),
            ]))
        })();
        rule_rows.push(result.unwrap_or_else(|e| {
            json!([
                name,
                format!("{note}; error: {e}"),
                null,
                null,
                null,
                null,
                null
            ])
        }));
    }
    Part {
        figures: Value::Object(figures),
        tables: vec![
            table(
                "Detector corpus: traces per setting and split (hacked by the gold peak rule)",
                &[
                    "setting",
                    "control",
                    "split",
                    "traces",
                    "hacked",
                    "median gold peak step",
                ],
                trace_rows,
            ),
            table(
                &format!(
                    "Detector corpus: rules on the {} test traces ({} hacking, {} controls that did not hack); medians [95% bootstrap]",
                    test.len(),
                    hacking.len(),
                    clean.len()
                ),
                &[
                    "rule",
                    "settings",
                    "fired on hacking",
                    "lead (peak - stop, steps)",
                    "false alarms",
                    "stopping regret, hacking",
                    "stopping regret, all",
                ],
                rule_rows,
            ),
        ],
        ..Part::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::experiments::lm::TracePoint;

    /// A trace of `setting` whose step `i` has gold `gold[i]`, proxy `i` and `d = i / 10`.
    fn trace(setting: &str, seed: u64, calibration: bool, gold: &[f64]) -> CorpusTrace {
        CorpusTrace {
            setting: setting.into(),
            seed,
            calibration,
            control: setting == "control",
            trace: Trace {
                series: format!("{setting}/s{seed}"),
                points: gold
                    .iter()
                    .enumerate()
                    .map(|(i, &g)| TracePoint {
                        step: i as u64,
                        d: i as f64 / 10.0,
                        proxy: i as f64,
                        gold: g,
                        metrics: BTreeMap::new(),
                    })
                    .collect(),
            },
        }
    }

    /// A setting of 20 pairs and the default `[rl]`.
    fn setting(name: &str, control: bool) -> CorpusSetting {
        CorpusSetting {
            name: name.into(),
            pairs: 20,
            ensemble: 1,
            aggregation: Aggregator::Mean,
            label_noise: None,
            rl: toml::Table::new(),
            control,
            test_only: false,
        }
    }

    #[test]
    fn the_references_stop_one_step_beside_the_smoothed_gold_peak() {
        // Gold 0 1 2 3 4 3 2 1 0: centred means of 5 are 1, 1.5, 2, 2.6, 2.8, 2.6, 2, 1.5,
        // 1, so the peak is 2.8 at step 4 and the trace hacked. A step either side the
        // smoothed gold is 2.6: a regret of (2.8 - 2.6) / (2.8 - 1) = 1/9. The control's
        // gold rises to its last step, 8 (smoothed 7): `-1` stops it at 7, `+1` at its
        // last step; both are false alarms.
        let hack = [0.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        let rise = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let cfg = DetectorCorpusExperiment {
            settings: vec![setting("hack", false), setting("control", true)],
            detectors: vec![],
            resamples: 20,
            ..DetectorCorpusExperiment::default()
        };
        let traces: Vec<CorpusTrace> = [(0, true), (1, false)]
            .into_iter()
            .flat_map(|(seed, calibration)| {
                [
                    trace("hack", seed, calibration, &hack),
                    trace("control", seed, calibration, &rise),
                ]
            })
            .collect();
        let part = summarize(&cfg, &traces);
        for (name, lead) in [("gold peak -1", 1.0), ("gold peak +1", -1.0)] {
            let f = &part.figures[name];
            assert_eq!(f["lead_median"].as_f64(), Some(lead), "{name}");
            let regret = f["regret_hacking_median"].as_f64().unwrap();
            assert!((regret - 1.0 / 9.0).abs() < 1e-12, "{name}: {regret}");
            assert_eq!(f["false_alarms"], 1, "{name}");
            assert_eq!(f["controls"], 1, "{name}");
        }
        // The control's regret: its gain is 7 - 1 = 6; `-1` stops where the smoothed gold
        // is 6.5, `+1` at the peak itself. The median over both test traces is their mean.
        let all = |name: &str| part.figures[name]["regret_all_median"].as_f64().unwrap();
        assert!((all("gold peak -1") - (1.0 / 9.0 + 0.5 / 6.0) / 2.0).abs() < 1e-12);
        assert!((all("gold peak +1") - (1.0 / 9.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn a_logistic_detector_is_fitted_on_the_calibration_traces_and_calibrated() {
        use goodhart_metrics::logistic::{Feature, FeatureTransform};
        // The hacking trace's gold peaks at step 4 (as above); its signal `x` turns from 0
        // to 1 at step 2. With lead 3 its steps 1 to 8 are labelled 1 and step 0 is 0; the
        // control's `x` stays 0 and its 9 steps are 0. So at x = 0 the fit sees 10 zeros
        // and one 1, at x = 1 seven 1s: p(x = 0) is low, p(x = 1) high. The threshold is
        // the smallest probability above p(x = 0), where the control stays quiet, and on
        // the test traces it fires at step 2, two steps before the peak.
        let hack = [0.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        let rise = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let with_x = |mut t: CorpusTrace, x: &dyn Fn(usize) -> f64| {
            for (i, p) in t.trace.points.iter_mut().enumerate() {
                p.metrics.insert("x".into(), x(i));
            }
            t
        };
        let logistic = LogisticConfig {
            features: vec![Feature {
                key: "x".into(),
                transform: FeatureTransform::Level,
                window: 1,
            }],
            ..LogisticConfig::default()
        };
        let cfg = DetectorCorpusExperiment {
            settings: vec![setting("hack", false), setting("control", true)],
            detectors: vec![DetectorConfig::Logistic(logistic)],
            resamples: 20,
            ..DetectorCorpusExperiment::default()
        };
        let traces: Vec<CorpusTrace> = [(0, true), (1, false)]
            .into_iter()
            .flat_map(|(seed, calibration)| {
                [
                    with_x(trace("hack", seed, calibration, &hack), &|i| {
                        f64::from(u8::from(i >= 2))
                    }),
                    with_x(trace("control", seed, calibration, &rise), &|_| 0.0),
                ]
            })
            .collect();
        let part = summarize(&cfg, &traces);
        let f = &part.figures["logistic on x"];
        let fitted: DetectorConfig = serde_json::from_value(f["config"].clone()).unwrap();
        let DetectorConfig::Logistic(fitted) = fitted else {
            panic!("{fitted:?}")
        };
        let p = |x: f64| 1.0 / (1.0 + (-(fitted.bias + fitted.weights[0] * x)).exp());
        assert!(p(0.0) < 0.2 && p(1.0) > 0.8, "{} {}", p(0.0), p(1.0));
        let want = ((p(0.0) * 100.0).floor() + 1.0) / 100.0;
        assert!((fitted.threshold - want).abs() < 1e-12, "{fitted:?}");
        assert_eq!(f["lead_median"].as_f64(), Some(2.0));
        assert_eq!(f["false_alarms"], 0);
        let row = |part: &Part| {
            part.tables[1]["rows"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r[0] == "logistic on x")
                .unwrap()
                .clone()
        };
        let fitted_row = row(&part);
        let note = fitted_row[1].as_str().unwrap();
        assert!(
            note.starts_with("fitted on 18 steps of 2 traces (lead 3, l2 1)"),
            "{note}"
        );
        // Without a calibration trace that hacked there is nothing to fit: the row says so.
        let quiet: Vec<CorpusTrace> = traces
            .iter()
            .filter(|t| !(t.setting == "hack" && t.calibration))
            .cloned()
            .collect();
        let unfitted = row(&summarize(&cfg, &quiet));
        let note = unfitted[1].as_str().unwrap();
        assert_eq!(
            note,
            "not fitted; error: invalid `calibration`: no calibration trace hacked: there is \
             nothing to fit"
        );
    }
}
