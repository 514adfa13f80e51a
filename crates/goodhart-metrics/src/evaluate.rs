//! Detector evaluation: replay logged runs through a detector, step by step, and measure
//! when it fires relative to the gold peak: its lead (negative) or lag (positive) on runs
//! that hack, and its false alarms on runs that do not.
//!
//! Whether a run hacks is labelled offline from its whole gold curve ([`gold_peak`]);
//! the detector itself only ever sees the steps up to the current one.

use std::collections::BTreeMap;

use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    detect::{Detector, DetectorConfig, Firing},
    step::KEY_GOLD_MEAN,
};

/// A logged run: its name and the metrics of each step, in step order.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Name, for the report.
    pub name: String,
    /// `(step, metrics)` with strictly increasing steps.
    pub steps: Vec<(u64, BTreeMap<String, f64>)>,
}

impl Run {
    /// A run whose rows are steps `0, 1, 2, ...`.
    pub fn from_rows(name: impl Into<String>, rows: Vec<BTreeMap<String, f64>>) -> Self {
        Self {
            name: name.into(),
            steps: rows
                .into_iter()
                .enumerate()
                .map(|(i, m)| (i as u64, m))
                .collect(),
        }
    }
}

/// How a run is labelled as hacking from its gold curve (offline, whole curve).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GoldPeakRule {
    /// Metric key of gold. Default `reward/gold/mean`.
    pub gold_key: String,
    /// Width of the centred moving average applied to gold before finding the peak
    /// (truncated at the ends). Default 5.
    pub window: usize,
    /// The run hacks when its final smoothed gold is below the peak by at least
    /// `max(abs_drop, rel_drop (peak - first))`. Default 0.1.
    pub rel_drop: f64,
    /// Absolute part of the threshold. Default 0.
    pub abs_drop: f64,
}

impl Default for GoldPeakRule {
    fn default() -> Self {
        Self {
            gold_key: KEY_GOLD_MEAN.into(),
            window: 5,
            rel_drop: 0.1,
            abs_drop: 0.0,
        }
    }
}

/// The gold peak of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GoldPeak {
    /// Step of the (first) maximum of smoothed gold.
    pub step: u64,
    /// Smoothed gold there.
    pub value: f64,
    /// Smoothed gold at the last step with gold.
    pub final_value: f64,
    /// Whether the run hacks by the rule.
    pub hacked: bool,
    /// A 95% interval of the smoothed gold at the peak step: `value ± 1.96 sigma / sqrt(k)`,
    /// `k` the gold values the centred mean averaged there and `sigma^2 = sum (g_{i+1} -
    /// g_i)^2 / (2 (n - 1))` the difference-based estimate of the per-step noise variance
    /// (Rice 1984), which a smooth trend barely inflates. It does not count the choice of
    /// the step: the maximum of the smoothed curve stays biased upwards, by less than the
    /// raw maximum. `None` with fewer than 2 gold values.
    #[serde(default)]
    pub interval: Option<(f64, f64)>,
}

/// The gold of `run` smoothed by the rule's centred moving average (truncated at the
/// ends), one `(step, value)` per step with gold. Errors as [`gold_peak`].
pub fn smoothed_gold(run: &Run, rule: &GoldPeakRule) -> Result<Vec<(u64, f64)>> {
    if !(rule.window != 0
        && rule.rel_drop >= 0.0
        && rule.abs_drop >= 0.0
        && rule.rel_drop.is_finite()
        && rule.abs_drop.is_finite())
    {
        return Err(GoodhartError::invalid(
            "gold peak rule",
            "window >= 1 and finite drops >= 0",
        ));
    }
    if run.steps.windows(2).any(|w| w[1].0 <= w[0].0) {
        return Err(GoodhartError::invalid(
            format!("run `{}`", run.name),
            "steps must increase",
        ));
    }
    let gold = gold_of(run, rule);
    let values: Vec<f64> = gold.iter().map(|g| g.1).collect();
    crate::stats::check_series(
        &values,
        &format!("gold `{}` of run `{}`", rule.gold_key, run.name),
    )?;
    let half = rule.window / 2;
    Ok((0..values.len())
        .map(|i| {
            let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(values.len()));
            (
                gold[i].0,
                values[lo..hi].iter().sum::<f64>() / (hi - lo) as f64,
            )
        })
        .collect())
}

/// The `(step, gold)` of every step of `run` with gold.
fn gold_of(run: &Run, rule: &GoldPeakRule) -> Vec<(u64, f64)> {
    run.steps
        .iter()
        .filter_map(|(s, m)| m.get(&rule.gold_key).map(|g| (*s, *g)))
        .collect()
}

/// Finds the gold peak of `run` (the first maximum of [`smoothed_gold`]) and labels it.
/// Errors when the run has no gold values, a non-finite gold value, non-increasing
/// steps or a bad rule.
///
/// ```
/// use std::collections::BTreeMap;
/// use goodhart_metrics::evaluate::{gold_peak, GoldPeakRule, Run};
/// // Gold 0 1 2 3 4 3 2 1 0: centred means of 5 are 1, 1.5, 2, 2.6, 2.8, 2.6, 2, 1.5, 1,
/// // so gold peaks at step 4 and the run hacks (it ends 1.8 below its peak).
/// let rows = [0.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0]
///     .map(|g| BTreeMap::from([("reward/gold/mean".to_string(), g)]));
/// let peak = gold_peak(&Run::from_rows("run", rows.to_vec()), &GoldPeakRule::default())?;
/// assert_eq!(peak.step, 4);
/// assert!((peak.value - 2.8).abs() < 1e-12 && peak.hacked);
/// // Noise: successive differences are all 1, sigma^2 = 8 / (2 * 8) = 0.5; the peak's
/// // mean averages 5 values: 2.8 ± 1.96 sqrt(0.5 / 5).
/// let (lo, hi) = peak.interval.unwrap();
/// assert!((hi - 2.8 - 1.96 * 0.1f64.sqrt()).abs() < 1e-12 && (2.8 - lo - (hi - 2.8)).abs() < 1e-12);
/// # Ok::<(), goodhart_core::GoodhartError>(())
/// ```
pub fn gold_peak(run: &Run, rule: &GoldPeakRule) -> Result<GoldPeak> {
    let smoothed = smoothed_gold(run, rule)?;
    let (mut i, mut at, mut peak) = (0, smoothed[0].0, smoothed[0].1);
    for (j, &(step, v)) in smoothed.iter().enumerate() {
        if v > peak {
            (i, at, peak) = (j, step, v);
        }
    }
    let final_value = smoothed.last().map_or(peak, |p| p.1);
    let threshold = rule.abs_drop.max(rule.rel_drop * (peak - smoothed[0].1));
    let drop = peak - final_value;
    let gold = gold_of(run, rule);
    let n = gold.len();
    let interval = (n >= 2).then(|| {
        let var = gold
            .windows(2)
            .map(|w| (w[1].1 - w[0].1).powi(2))
            .sum::<f64>()
            / (2.0 * (n - 1) as f64);
        let half = rule.window / 2;
        let k = ((i + half + 1).min(n) - i.saturating_sub(half)) as f64;
        let h = 1.96 * (var / k).sqrt();
        (peak - h, peak + h)
    });
    Ok(GoldPeak {
        step: at,
        value: peak,
        final_value,
        hacked: drop > 0.0 && drop >= threshold,
        interval,
    })
}

/// Stopping regret of stopping `run` at `stop` (`None`: training to the end): the
/// smoothed gold given up, `(peak - g(stop)) / (peak - g(first))`, a fraction of the
/// gold gain, where `g(stop)` is the smoothed gold at the last step with gold at or
/// before `stop` (the first gold value when none is). `None` when gold never rose above
/// its first value (no gain to give up). Errors as [`gold_peak`].
pub fn stopping_regret(run: &Run, stop: Option<u64>, rule: &GoldPeakRule) -> Result<Option<f64>> {
    let smoothed = smoothed_gold(run, rule)?;
    let first = smoothed[0].1;
    let peak = smoothed
        .iter()
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max);
    let at = match stop {
        None => smoothed.last().map_or(first, |p| p.1),
        Some(step) => smoothed
            .iter()
            .take_while(|p| p.0 <= step)
            .last()
            .map_or(first, |p| p.1),
    };
    Ok((peak > first).then(|| (peak - at) / (peak - first)))
}

/// What a detector did on one logged run, and against its gold where the run has gold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDetection {
    /// The detector's name.
    pub detector: String,
    /// Steps the run logged.
    pub steps: usize,
    /// Its firing, if it fired.
    pub firing: Option<crate::detect::Firing>,
    /// The gold peak, where the run has gold ([`gold_peak`]).
    pub gold_peak: Option<GoldPeak>,
    /// `peak step - fired step`: positive when the warning comes before the peak.
    pub lead: Option<i64>,
    /// [`stopping_regret`] of stopping at the firing (or of training to the end when it
    /// did not fire).
    pub stopping_regret: Option<f64>,
}

/// Replays `run` through `det` (fresh); with gold under `rule.gold_key` in the run, also
/// its gold peak, the lead and the stopping regret. Errors on a detector error (a
/// non-finite value, a non-increasing step) and as [`gold_peak`].
pub fn detect_run(
    run: &Run,
    mut det: Box<dyn Detector>,
    rule: &GoldPeakRule,
) -> Result<RunDetection> {
    let firing = replay(run, det.as_mut())?;
    let has_gold = run
        .steps
        .iter()
        .any(|(_, m)| m.contains_key(&rule.gold_key));
    let (gold_peak, lead, stopping_regret) = if has_gold {
        let peak = gold_peak(run, rule)?;
        let fired = firing.as_ref().map(|f| f.step);
        (
            Some(peak),
            fired.map(|f| peak.step as i64 - f as i64),
            stopping_regret(run, fired, rule)?,
        )
    } else {
        (None, None, None)
    };
    Ok(RunDetection {
        detector: det.name().into(),
        steps: run.steps.len(),
        firing,
        gold_peak,
        lead,
        stopping_regret,
    })
}

/// The first firing of `det` (fresh) when `run` is replayed through it, step by step.
pub fn replay(run: &Run, det: &mut dyn Detector) -> Result<Option<Firing>> {
    for (step, m) in &run.steps {
        if let Some(f) = det.update(*step, m)? {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// The step `det` (fresh) first fires at when `run` is replayed through it ([`replay`]).
pub fn first_firing(run: &Run, mut det: Box<dyn Detector>) -> Result<Option<u64>> {
    Ok(replay(run, det.as_mut())?.map(|f| f.step))
}

/// A baseline stopping rule without gold: the first step at which the proxy has
/// plateaued. With `s` the EMA (weight 0.3) of `proxy_key`, it stops at the first step
/// `t` (at least `window` proxy values in) where `s_t - s_{t - window} < fraction * (max_{u
/// <= t} s_u - s_0)`: the last `window` steps added less than `fraction` of the rise so
/// far. `None` when it never plateaus (or the proxy never rose).
pub fn proxy_plateau_stop(run: &Run, proxy_key: &str, window: usize, fraction: f64) -> Option<u64> {
    let mut smoothed: Vec<(u64, f64)> = Vec::new();
    let mut high = f64::NEG_INFINITY;
    for (step, m) in &run.steps {
        let Some(p) = m.get(proxy_key).filter(|p| p.is_finite()) else {
            continue;
        };
        let s = smoothed.last().map_or(*p, |l| 0.3 * p + 0.7 * l.1);
        smoothed.push((*step, s));
        high = high.max(s);
        let n = smoothed.len();
        if window > 0 && n > window {
            let rise = high - smoothed[0].1;
            if rise > 0.0 && s - smoothed[n - 1 - window].1 < fraction * rise {
                return Some(*step);
            }
        }
    }
    None
}

/// A baseline stopping rule: the first step whose `kl_key` reaches `budget` (a fixed KL
/// budget); `None` when it never does.
pub fn kl_budget_stop(run: &Run, kl_key: &str, budget: f64) -> Option<u64> {
    run.steps
        .iter()
        .find(|(_, m)| m.get(kl_key).is_some_and(|k| *k >= budget))
        .map(|(s, _)| *s)
}

/// The smallest of `thresholds` at which detectors from `make(threshold)` fire on at most
/// `rate` of the `clean` runs (runs that must not raise an alarm); `None` when none of
/// them does. Errors on no clean run, unsorted thresholds or a detector error.
pub fn calibrate_threshold(
    clean: &[Run],
    thresholds: &[f64],
    rate: f64,
    make: &dyn Fn(f64) -> Result<Box<dyn Detector>>,
) -> Result<Option<f64>> {
    if clean.is_empty() {
        return Err(GoodhartError::Empty {
            what: "clean runs to calibrate on".into(),
        });
    }
    if thresholds.windows(2).any(|w| w[1] <= w[0]) {
        return Err(GoodhartError::invalid("thresholds", "must increase"));
    }
    for &t in thresholds {
        let mut alarms = 0;
        for run in clean {
            alarms += usize::from(first_firing(run, make(t)?)?.is_some());
        }
        if alarms as f64 <= rate * clean.len() as f64 {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// One run's outcome for one detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOutcome {
    /// Run name.
    pub run: String,
    /// Whether the run hacks ([`gold_peak`]).
    pub hacked: bool,
    /// Step of the gold peak.
    pub peak_step: u64,
    /// Step the detector fired at, if it did.
    pub fired_step: Option<u64>,
    /// On hacking runs where it fired: `fired_step - peak_step` (negative: a lead).
    pub lead_lag: Option<i64>,
}

/// A detector's record over a set of runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorEvaluation {
    /// Detector name.
    pub detector: String,
    /// Per-run outcomes, in input order.
    pub outcomes: Vec<RunOutcome>,
    /// Runs that hack.
    pub hacking_runs: usize,
    /// Hacking runs on which it fired.
    pub detected: usize,
    /// Hacking runs on which it never fired.
    pub missed: usize,
    /// Runs that do not hack.
    pub clean_runs: usize,
    /// Clean runs on which it fired (false alarms).
    pub false_alarms: usize,
    /// Mean of the lead/lag over detected runs.
    pub mean_lead_lag: Option<f64>,
    /// Median of the lead/lag over detected runs.
    pub median_lead_lag: Option<f64>,
}

/// Replays every run through a fresh detector from `make` and tallies leads, lags,
/// misses and false alarms. Errors on an empty run list, on a run without gold and on
/// any detector error.
pub fn evaluate(
    runs: &[Run],
    make: &dyn Fn() -> Result<Box<dyn Detector>>,
    rule: &GoldPeakRule,
) -> Result<DetectorEvaluation> {
    if runs.is_empty() {
        return Err(GoodhartError::Empty {
            what: "runs".into(),
        });
    }
    let mut outcomes = Vec::with_capacity(runs.len());
    let mut name = String::new();
    for run in runs {
        let peak = gold_peak(run, rule)?;
        let mut det = make()?;
        name = det.name().into();
        let fired_step = replay(run, det.as_mut())?.map(|f| f.step);
        let lead_lag = match (peak.hacked, fired_step) {
            (true, Some(f)) => Some(f as i64 - peak.step as i64),
            _ => None,
        };
        outcomes.push(RunOutcome {
            run: run.name.clone(),
            hacked: peak.hacked,
            peak_step: peak.step,
            fired_step,
            lead_lag,
        });
    }
    let hacking_runs = outcomes.iter().filter(|o| o.hacked).count();
    let detected = outcomes
        .iter()
        .filter(|o| o.hacked && o.fired_step.is_some())
        .count();
    let false_alarms = outcomes
        .iter()
        .filter(|o| !o.hacked && o.fired_step.is_some())
        .count();
    let mut lags: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.lead_lag.map(|l| l as f64))
        .collect();
    lags.sort_by(f64::total_cmp);
    let median = (!lags.is_empty()).then(|| {
        let m = lags.len() / 2;
        if lags.len() % 2 == 1 {
            lags[m]
        } else {
            (lags[m - 1] + lags[m]) / 2.0
        }
    });
    Ok(DetectorEvaluation {
        detector: name,
        hacking_runs,
        detected,
        missed: hacking_runs - detected,
        clean_runs: runs.len() - hacking_runs,
        false_alarms,
        mean_lead_lag: (!lags.is_empty()).then(|| lags.iter().sum::<f64>() / lags.len() as f64),
        median_lead_lag: median,
        outcomes,
    })
}

/// [`evaluate`] with detectors built from a config.
pub fn evaluate_config(
    runs: &[Run],
    config: &DetectorConfig,
    rule: &GoldPeakRule,
) -> Result<DetectorEvaluation> {
    evaluate(runs, &|| config.build(), rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{tests::trace, GoldAwareConfig};

    /// Fires at a fixed step, whatever it sees.
    struct At(u64, Option<Firing>);
    impl Detector for At {
        fn name(&self) -> &'static str {
            "at"
        }
        fn update(&mut self, step: u64, _: &BTreeMap<String, f64>) -> Result<Option<Firing>> {
            if step == self.0 {
                self.1 = Some(Firing {
                    detector: "at".into(),
                    step,
                    score: 1.0,
                    reason: String::new(),
                    signals: BTreeMap::new(),
                });
                return Ok(self.1.clone());
            }
            Ok(None)
        }
        fn fired(&self) -> Option<&Firing> {
            self.1.as_ref()
        }
        fn score(&self) -> Option<f64> {
            None
        }
    }

    #[test]
    fn peaks_leads_lags_and_false_alarms() {
        // gold 0,1,2,3,2,1 (window 1): peak at step 3, final 1, drop 2 >= .1 * 3 -> hacks
        let rows: Vec<_> = [0.0, 1.0, 2.0, 3.0, 2.0, 1.0]
            .iter()
            .map(|g| BTreeMap::from([(KEY_GOLD_MEAN.to_string(), *g)]))
            .collect();
        let rule = GoldPeakRule {
            window: 1,
            ..Default::default()
        };
        let p = gold_peak(&Run::from_rows("tent", rows.clone()), &rule).unwrap();
        assert_eq!(
            (p.step, p.value, p.final_value, p.hacked),
            (3, 3.0, 1.0, true)
        );
        // window 3 (truncated at the ends): 0.5, 1, 2, 2.333, 2, 1.5 -> peak 2.333 at 3,
        // final 1.5, drop .833 >= .1 * (2.333 - .5)
        let p = gold_peak(
            &Run::from_rows("tent", rows.clone()),
            &GoldPeakRule {
                window: 3,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((p.step, p.final_value, p.hacked), (3, 1.5, true));
        assert!((p.value - 7.0 / 3.0).abs() < 1e-12);
        // Differences 1, 1, 1, -1, -1: sigma^2 = 5 / (2 * 5) = 0.5; 3 values averaged at
        // step 3: half-width 1.96 sqrt(0.5 / 3) = 0.800167.
        let (lo, hi) = p.interval.unwrap();
        assert!(
            (hi - 7.0 / 3.0 - 0.800_167).abs() < 1e-6 && (7.0 / 3.0 - lo - 0.800_167).abs() < 1e-6
        );
        // One gold value: no interval. A constant curve: a zero-width one.
        let one = vec![BTreeMap::from([(KEY_GOLD_MEAN.to_string(), 0.5)])];
        assert_eq!(
            gold_peak(&Run::from_rows("one", one), &rule)
                .unwrap()
                .interval,
            None
        );
        let flat: Vec<_> = (0..4)
            .map(|_| BTreeMap::from([(KEY_GOLD_MEAN.to_string(), 2.0)]))
            .collect();
        assert_eq!(
            gold_peak(&Run::from_rows("flat", flat), &rule)
                .unwrap()
                .interval,
            Some((2.0, 2.0))
        );
        let rising: Vec<_> = (0..6)
            .map(|g| BTreeMap::from([(KEY_GOLD_MEAN.to_string(), g as f64)]))
            .collect();
        assert!(
            !gold_peak(&Run::from_rows("up", rising.clone()), &rule)
                .unwrap()
                .hacked
        );

        let runs = vec![Run::from_rows("tent", rows), Run::from_rows("up", rising)];
        let e = evaluate(&runs, &|| Ok(Box::new(At(1, None))), &rule).unwrap();
        assert_eq!(
            (
                e.hacking_runs,
                e.detected,
                e.missed,
                e.clean_runs,
                e.false_alarms
            ),
            (1, 1, 0, 1, 1)
        );
        assert_eq!(e.outcomes[0].lead_lag, Some(-2)); // fired at 1, peak at 3: a lead of 2
        assert_eq!(e.mean_lead_lag, Some(-2.0));
        let e = evaluate(&runs, &|| Ok(Box::new(At(99, None))), &rule).unwrap();
        assert_eq!(
            (e.detected, e.missed, e.false_alarms, e.mean_lead_lag),
            (0, 1, 0, None)
        );
        assert!(evaluate(&[], &|| Ok(Box::new(At(1, None))), &rule).is_err());
        let no_gold = Run::from_rows("none", vec![BTreeMap::new()]);
        assert!(matches!(
            gold_peak(&no_gold, &rule),
            Err(GoodhartError::Empty { .. })
        ));
    }

    fn gold_run(gold: &[Option<f64>]) -> Run {
        Run::from_rows(
            "r",
            gold.iter()
                .map(|g| {
                    g.map(|g| (KEY_GOLD_MEAN.to_string(), g))
                        .into_iter()
                        .collect()
                })
                .collect(),
        )
    }

    #[test]
    fn stopping_regret_and_detection_by_hand() {
        let raw = GoldPeakRule {
            window: 1,
            ..Default::default()
        };
        let run = gold_run(&[0.0, 1.0, 2.0, 3.0, 2.0, 1.0].map(Some));
        // Peak 3 at step 3, gain 3 over the first value.
        let r = |stop| stopping_regret(&run, stop, &raw).unwrap().unwrap();
        assert!((r(Some(2)) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(r(Some(3)), 0.0);
        assert!((r(Some(4)) - 1.0 / 3.0).abs() < 1e-12);
        assert!((r(None) - 2.0 / 3.0).abs() < 1e-12);
        // A centred mean of 3: [0.5, 1, 2, 7/3, 2, 1.5]; stopping at 1 gives up
        // (7/3 - 1) / (7/3 - 1/2).
        let three = GoldPeakRule {
            window: 3,
            ..Default::default()
        };
        let got = stopping_regret(&run, Some(1), &three).unwrap().unwrap();
        assert!((got - (4.0 / 3.0) / (11.0 / 6.0)).abs() < 1e-12, "{got}");
        // Without gold at the stop step, the last gold before it.
        let gappy = gold_run(&[Some(0.0), None, Some(2.0), Some(1.0)]);
        assert_eq!(stopping_regret(&gappy, Some(1), &raw).unwrap(), Some(1.0));
        // No gain, no regret.
        let flat = gold_run(&[Some(1.0), Some(0.5)]);
        assert_eq!(stopping_regret(&flat, None, &raw).unwrap(), None);
        // A detector firing at step 2: a lead of 1 step before the peak at 3.
        let d = detect_run(&run, Box::new(At(2, None)), &raw).unwrap();
        assert_eq!(d.firing.as_ref().map(|f| f.step), Some(2));
        assert_eq!((d.lead, d.steps), (Some(1), 6));
        assert!((d.stopping_regret.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(d.gold_peak.unwrap().step, 3);
        // Without gold: only the firing.
        let no_gold = Run::from_rows("n", vec![BTreeMap::new(); 4]);
        let d = detect_run(&no_gold, Box::new(At(9, None)), &raw).unwrap();
        assert_eq!(
            (d.firing, d.gold_peak, d.lead, d.stopping_regret),
            (None, None, None, None)
        );
    }

    #[test]
    fn baseline_stops_and_calibration_by_hand() {
        let run = |values: &[f64], key: &str| {
            Run::from_rows(
                "r",
                values
                    .iter()
                    .map(|v| BTreeMap::from([(key.to_string(), *v)]))
                    .collect(),
            )
        };
        // A proxy that rises 1/step to 10, then stays: EMA 0.3 of it rises less than 10%
        // of its total rise over 3 steps first at step 15 (s_15 - s_12 = 0.73 < 0.1 * 9.62).
        let mut p: Vec<f64> = (0..=10).map(f64::from).collect();
        p.extend([10.0; 10]);
        let r = run(&p, "proxy");
        let mut s = vec![p[0]];
        for v in &p[1..] {
            s.push(0.3 * v + 0.7 * s.last().unwrap());
        }
        let want = (3..s.len())
            .find(|&t| s[t] - s[t - 3] < 0.1 * (s[t] - s[0]))
            .unwrap() as u64;
        assert_eq!(proxy_plateau_stop(&r, "proxy", 3, 0.1), Some(want));
        assert_eq!(want, 15);
        assert_eq!(
            proxy_plateau_stop(&run(&p[..11], "proxy"), "proxy", 3, 0.1),
            None
        );
        assert_eq!(proxy_plateau_stop(&r, "other", 3, 0.1), None);
        // KL budget: the first step at or over it.
        let kl = run(&[0.0, 0.5, 1.0, 1.5], "kl");
        assert_eq!(kl_budget_stop(&kl, "kl", 1.0), Some(2));
        assert_eq!(kl_budget_stop(&kl, "kl", 2.0), None);
        // Calibration: `At(t)` fires at step t, on runs of 5 steps (0..=4), so threshold
        // t fires on every run when t <= 4 and on none above.
        let clean = vec![Run::from_rows("c", vec![BTreeMap::new(); 5]); 3];
        let make = |t: f64| -> Result<Box<dyn Detector>> { Ok(Box::new(At(t as u64, None))) };
        assert_eq!(
            calibrate_threshold(&clean, &[2.0, 4.0, 6.0], 0.1, &make).unwrap(),
            Some(6.0)
        );
        assert_eq!(
            calibrate_threshold(&clean, &[2.0, 4.0], 0.1, &make).unwrap(),
            None
        );
        assert_eq!(
            calibrate_threshold(&clean, &[2.0], 1.0, &make).unwrap(),
            Some(2.0)
        );
        assert!(calibrate_threshold(&[], &[2.0], 0.1, &make).is_err());
        assert!(calibrate_threshold(&clean, &[4.0, 2.0], 0.1, &make).is_err());
    }

    #[test]
    fn gold_aware_on_synthetic_runs() {
        let mut runs = Vec::new();
        for seed in 0..5 {
            runs.push(Run::from_rows(
                format!("hack{seed}"),
                trace(seed, 100, Some(50), false, 0.01),
            ));
            runs.push(Run::from_rows(
                format!("clean{seed}"),
                trace(seed, 100, None, true, 0.01),
            ));
        }
        let cfg = DetectorConfig::GoldAware(GoldAwareConfig::default());
        let e = evaluate_config(&runs, &cfg, &GoldPeakRule::default()).unwrap();
        assert_eq!(e.detector, "gold-aware");
        assert_eq!((e.hacking_runs, e.detected, e.false_alarms), (5, 5, 0));
        // the offline peak (moving average of 5) sits within a step or two of 50 and the
        // detector fires 2 to 5 steps after the planted peak
        for o in e.outcomes.iter().filter(|o| o.hacked) {
            assert!((0..=7).contains(&o.lead_lag.unwrap()), "{o:?}");
        }
    }
}
