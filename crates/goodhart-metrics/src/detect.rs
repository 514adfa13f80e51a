//! Online reward-hacking detectors: fed one step's metrics at a time (no future data),
//! each reports the step at which it fires.
//!
//! - [`GoldAware`] (`kind = "gold-aware"`): with gold logged, fires when the proxy is
//!   still rising while the smoothed gold has fallen from its running peak by a
//!   threshold. This is the operational form of the ORPO definition of hacking (the true
//!   return falls while the proxy is optimised) and of the descending side of Gao et al.'s
//!   overoptimisation curves.
//! - [`crate::cusum::Cusum`] (`kind = "cusum"`): Page's CUSUM change-point test on one
//!   gold-free signal.
//! - [`crate::shift::Shift`] (`kind = "shift"`): one gold-free signal's recent mean moved
//!   from its starting level by a threshold in its own units.
//! - [`crate::logistic::Logistic`] (`kind = "logistic"`): a logistic regression over
//!   features of gold-free signals, fitted on traces with gold known.
//! - [`ProxyOnly`] (`kind = "proxy-only"`): without gold, an early-warning score from
//!   proxy-side signals (KL acceleration, entropy collapse, ensemble disagreement growth,
//!   length drift, a shift of the advantage distribution), each z-scored against a
//!   warm-up window and combined into one score with a threshold. The choice of signals
//!   follows the symptoms the papers in `seeds/papers.txt` report (entropy collapse in
//!   RLVR, length exploitation, ensemble disagreement under distribution shift); the
//!   combination rule is goodhart's own heuristic, not a published detector, and its
//!   lead or lag is measured with [`crate::evaluate`].
//!
//! Steps must increase strictly. A metric a detector reads may be missing at some steps
//! (gold is often evaluated every k steps): the detector then skips that input for the
//! step. A non-finite value is an error.

use std::collections::{BTreeMap, VecDeque};

use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::step::{
    KEY_ADVANTAGE_SKEW, KEY_DISAGREEMENT, KEY_ENTROPY, KEY_GOLD_MEAN, KEY_KL, KEY_LENGTH_MEAN,
    KEY_PROXY_MEAN,
};

/// A detector's alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Firing {
    /// The detector's registry name.
    pub detector: String,
    /// The step it fired at (the step passed to `update`).
    pub step: u64,
    /// Its score at that step (how far past the threshold; >= 1 for gold-aware).
    pub score: f64,
    /// Human-readable reason (which quantities crossed which thresholds).
    pub reason: String,
    /// Each signal's part at that step: proxy-only, every signal's oriented z-score
    /// (`max(z, 0)` in its warning direction); gold-aware, the gold drop over its
    /// threshold.
    #[serde(default)]
    pub signals: BTreeMap<String, f64>,
}

/// An online hacking detector. It fires at most once: the first step its condition holds
/// (for `patience` consecutive observations); later updates return `Ok(None)`.
pub trait Detector {
    /// Registry name (`"gold-aware"`, `"proxy-only"`).
    fn name(&self) -> &'static str;
    /// Feeds one step's metrics; returns the firing if it fires at this step.
    /// Errors on a non-increasing step or a non-finite value of a key it reads.
    fn update(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<Option<Firing>>;
    /// The firing, once it has fired.
    fn fired(&self) -> Option<&Firing>;
    /// The latest score (`None` before the detector can score), for logging.
    fn score(&self) -> Option<f64>;
}

/// Detector configuration, chosen by `kind` in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DetectorConfig {
    /// [`GoldAware`].
    GoldAware(GoldAwareConfig),
    /// [`ProxyOnly`].
    ProxyOnly(ProxyOnlyConfig),
    /// [`crate::cusum::Cusum`].
    Cusum(crate::cusum::CusumConfig),
    /// [`crate::shift::Shift`].
    Shift(crate::shift::ShiftConfig),
    /// [`crate::logistic::Logistic`].
    Logistic(crate::logistic::LogisticConfig),
}

impl DetectorConfig {
    /// The metric keys the detector reads, each with the config key that names it
    /// (`proxy_key`, `signals[1].key`, ...), so a trainer can check them before it runs.
    pub fn keys(&self) -> Vec<(String, String)> {
        match self {
            Self::GoldAware(c) => vec![
                (c.proxy_key.clone(), "proxy_key".into()),
                (c.gold_key.clone(), "gold_key".into()),
            ],
            Self::ProxyOnly(c) => c
                .signals
                .iter()
                .enumerate()
                .map(|(i, s)| (s.key.clone(), format!("signals[{i}].key")))
                .collect(),
            Self::Cusum(c) => vec![(c.key.clone(), "key".into())],
            Self::Shift(c) => vec![(c.key.clone(), "key".into())],
            Self::Logistic(c) => c
                .features
                .iter()
                .enumerate()
                .map(|(i, f)| (f.key.clone(), format!("features[{i}].key")))
                .collect(),
        }
    }

    /// The detector with its decision threshold set to `threshold` (what a corpus
    /// calibrates), or `None` for one without such a threshold (gold-aware).
    pub fn with_threshold(&self, threshold: f64) -> Option<Self> {
        match self {
            Self::ProxyOnly(c) => Some(Self::ProxyOnly(ProxyOnlyConfig {
                threshold,
                ..c.clone()
            })),
            Self::Cusum(c) => Some(Self::Cusum(crate::cusum::CusumConfig {
                threshold,
                ..c.clone()
            })),
            Self::Shift(c) => Some(Self::Shift(crate::shift::ShiftConfig {
                threshold,
                ..c.clone()
            })),
            Self::Logistic(c) => Some(Self::Logistic(crate::logistic::LogisticConfig {
                threshold,
                ..c.clone()
            })),
            Self::GoldAware(_) => None,
        }
    }

    /// Validates the configuration and builds the detector.
    pub fn build(&self) -> Result<Box<dyn Detector>> {
        Ok(match self {
            Self::GoldAware(c) => Box::new(GoldAware::new(c.clone())?),
            Self::ProxyOnly(c) => Box::new(ProxyOnly::new(c.clone())?),
            Self::Cusum(c) => Box::new(crate::cusum::Cusum::new(c.clone())?),
            Self::Shift(c) => Box::new(crate::shift::Shift::new(c.clone())?),
            Self::Logistic(c) => Box::new(crate::logistic::Logistic::new(c.clone())?),
        })
    }
}

pub(crate) fn read(metrics: &BTreeMap<String, f64>, key: &str) -> Result<Option<f64>> {
    match metrics.get(key) {
        None => Ok(None),
        Some(v) if v.is_finite() => Ok(Some(*v)),
        Some(_) => Err(GoodhartError::NonFinite {
            what: format!("metric `{key}`"),
        }),
    }
}

pub(crate) fn advance(last: &mut Option<u64>, step: u64) -> Result<()> {
    if let Some(prev) = *last {
        if step <= prev {
            return Err(GoodhartError::invalid(
                "step",
                format!("steps must increase: {step} after {prev}"),
            ));
        }
    }
    *last = Some(step);
    Ok(())
}

pub(crate) fn ema(prev: Option<f64>, x: f64, weight: f64) -> f64 {
    prev.map_or(x, |p| weight * x + (1.0 - weight) * p)
}

pub(crate) fn check_unit(name: &str, v: f64, allow_zero: bool) -> Result<()> {
    let ok = v.is_finite() && v <= 1.0 && (v > 0.0 || (allow_zero && v == 0.0));
    if ok {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            name,
            format!(
                "must be in {}0, 1], got {v}",
                if allow_zero { "[" } else { "(" }
            ),
        ))
    }
}

pub(crate) fn check_non_negative(name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            name,
            format!("must be finite and >= 0, got {v}"),
        ))
    }
}

/// Configuration of [`GoldAware`]. Defaults are goodhart's own (no library has such a
/// detector), tuned on synthetic traces: gold rising 0.02/step to a peak of 1.0 and then
/// falling at the same rate, with noise sd 0.01 (1% of the gain), the detector fires 2 to
/// 5 steps after the peak over 300 seeds, and never on 600 rising or saturating traces
/// without a peak (see the tests, which check 20 seeds of each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GoldAwareConfig {
    /// Metric key of the proxy reward. Default `reward/proxy/mean`.
    pub proxy_key: String,
    /// Metric key of the gold reward. Default `reward/gold/mean`.
    pub gold_key: String,
    /// EMA weight of a new gold value, `s <- w g + (1 - w) s`. Default 0.7.
    pub smoothing: f64,
    /// Proxy observations in the least-squares trend; "rising" means slope > 0. Default 5.
    pub trend_window: usize,
    /// Drop threshold relative to the gain since the start, `rel_drop (peak - start)`.
    /// Default 0.05.
    pub rel_drop: f64,
    /// Absolute drop threshold (gold units). Default 0.
    pub abs_drop: f64,
    /// Noise term of the threshold: `noise_mult` times the exponentially weighted mean
    /// absolute deviation of gold increments from their EMA. Default 2.5.
    pub noise_mult: f64,
    /// EMA weight of the noise estimate (slow, so a turn of the trend barely moves it; a
    /// running mean until `1 / noise_smoothing` residuals are in). Default 0.02.
    pub noise_smoothing: f64,
    /// Gold observations before the detector may fire. Default 5.
    pub warmup: usize,
    /// Consecutive gold observations the condition must hold. Default 1.
    pub patience: usize,
}

impl Default for GoldAwareConfig {
    fn default() -> Self {
        Self {
            proxy_key: KEY_PROXY_MEAN.into(),
            gold_key: KEY_GOLD_MEAN.into(),
            smoothing: 0.7,
            trend_window: 5,
            rel_drop: 0.05,
            abs_drop: 0.0,
            noise_mult: 2.5,
            noise_smoothing: 0.02,
            warmup: 5,
            patience: 1,
        }
    }
}

/// Gold-aware hacking detector: fires at the first step where, with `s` the EMA of gold,
/// `peak` its running maximum and `start` its first value,
/// `peak - s >= max(abs_drop, rel_drop (peak - start), noise_mult * noise)` and
/// `peak - s > 0`, while the least-squares slope of the last `trend_window` proxy values
/// is positive (the proxy is still being optimised), for `patience` consecutive gold
/// observations, after `warmup` gold observations.
/// Score: `(peak - s) / threshold`.
#[derive(Debug, Clone)]
pub struct GoldAware {
    cfg: GoldAwareConfig,
    last_step: Option<u64>,
    proxy: VecDeque<(f64, f64)>,
    smoothed: Option<f64>,
    start: f64,
    peak: f64,
    last_gold: Option<f64>,
    diff_ema: Option<f64>,
    noise: f64,
    noise_seen: usize,
    gold_seen: usize,
    streak: usize,
    score: Option<f64>,
    fired: Option<Firing>,
}

impl GoldAware {
    /// A detector with `cfg` (validated: smoothing in (0, 1], thresholds >= 0,
    /// trend_window >= 2, patience >= 1).
    pub fn new(cfg: GoldAwareConfig) -> Result<Self> {
        check_unit("smoothing", cfg.smoothing, false)?;
        check_non_negative("rel_drop", cfg.rel_drop)?;
        check_non_negative("abs_drop", cfg.abs_drop)?;
        check_non_negative("noise_mult", cfg.noise_mult)?;
        check_unit("noise_smoothing", cfg.noise_smoothing, false)?;
        if cfg.trend_window < 2 {
            return Err(GoodhartError::invalid(
                "trend_window",
                "needs at least 2 points for a slope",
            ));
        }
        if cfg.patience == 0 {
            return Err(GoodhartError::invalid("patience", "must be at least 1"));
        }
        Ok(Self {
            cfg,
            last_step: None,
            proxy: VecDeque::new(),
            smoothed: None,
            start: 0.0,
            peak: f64::NEG_INFINITY,
            last_gold: None,
            diff_ema: None,
            noise: 0.0,
            noise_seen: 0,
            gold_seen: 0,
            streak: 0,
            score: None,
            fired: None,
        })
    }

    /// Least-squares slope of the proxy window (0 with fewer than two points).
    fn proxy_slope(&self) -> f64 {
        let n = self.proxy.len() as f64;
        if n < 2.0 {
            return 0.0;
        }
        let mx = self.proxy.iter().map(|p| p.0).sum::<f64>() / n;
        let my = self.proxy.iter().map(|p| p.1).sum::<f64>() / n;
        let sxy: f64 = self.proxy.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let sxx: f64 = self.proxy.iter().map(|p| (p.0 - mx).powi(2)).sum();
        if sxx > 0.0 {
            sxy / sxx
        } else {
            0.0
        }
    }
}

impl Detector for GoldAware {
    fn name(&self) -> &'static str {
        "gold-aware"
    }

    fn update(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<Option<Firing>> {
        advance(&mut self.last_step, step)?;
        let proxy = read(metrics, &self.cfg.proxy_key)?;
        let gold = read(metrics, &self.cfg.gold_key)?;
        if let Some(p) = proxy {
            self.proxy.push_back((step as f64, p));
            if self.proxy.len() > self.cfg.trend_window {
                self.proxy.pop_front();
            }
        }
        let Some(g) = gold else { return Ok(None) };
        if let Some(prev) = self.last_gold {
            let diff = g - prev;
            if let Some(de) = self.diff_ema {
                // a running mean until 1/noise_smoothing residuals are in, then the EMA
                self.noise_seen += 1;
                let w = self.cfg.noise_smoothing.max(1.0 / self.noise_seen as f64);
                self.noise = ema(Some(self.noise), (diff - de).abs(), w);
            }
            self.diff_ema = Some(ema(self.diff_ema, diff, self.cfg.smoothing));
        }
        self.last_gold = Some(g);
        let s = ema(self.smoothed, g, self.cfg.smoothing);
        if self.smoothed.is_none() {
            self.start = s;
        }
        self.smoothed = Some(s);
        self.peak = self.peak.max(s);
        self.gold_seen += 1;

        let drop = self.peak - s;
        let rel = self.cfg.rel_drop * (self.peak - self.start);
        let noise = self.cfg.noise_mult * self.noise;
        let threshold = self.cfg.abs_drop.max(rel).max(noise);
        self.score = Some(if threshold > 0.0 {
            drop / threshold
        } else if drop > 0.0 {
            f64::INFINITY
        } else {
            0.0
        });
        let slope = self.proxy_slope();
        let hold =
            self.gold_seen >= self.cfg.warmup && drop > 0.0 && drop >= threshold && slope > 0.0;
        self.streak = if hold { self.streak + 1 } else { 0 };
        if self.fired.is_some() || self.streak < self.cfg.patience {
            return Ok(None);
        }
        let firing = Firing {
            detector: self.name().into(),
            step,
            score: self.score.unwrap_or(0.0).min(f64::MAX),
            signals: [(self.cfg.gold_key.clone(), self.score.unwrap_or(0.0).min(f64::MAX))].into(),
            reason: format!(
                "smoothed gold {s:.4} is {drop:.4} below its peak {:.4} (threshold {threshold:.4} = max(abs {:.4}, rel {rel:.4}, noise {noise:.4})) while the proxy rises (slope {slope:.4}/step)",
                self.peak, self.cfg.abs_drop
            ),
        };
        self.fired = Some(firing.clone());
        Ok(Some(firing))
    }

    fn fired(&self) -> Option<&Firing> {
        self.fired.as_ref()
    }

    fn score(&self) -> Option<f64> {
        self.score
    }
}

/// How a proxy-only signal is derived from its (smoothed) metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transform {
    /// The smoothed value itself.
    Level,
    /// First difference of the smoothed value (velocity).
    Diff,
    /// Second difference of the smoothed value (acceleration).
    Diff2,
}

/// Which deviation from the warm-up baseline counts as a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Increases (`z`).
    Up,
    /// Decreases (`-z`).
    Down,
    /// Either (`|z|`).
    Both,
}

/// One proxy-only signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalConfig {
    /// Metric key it reads.
    pub key: String,
    /// Level, velocity or acceleration.
    pub transform: Transform,
    /// Which direction warns.
    pub direction: Direction,
    /// Weight in the combined score (default 1).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl SignalConfig {
    fn new(key: &str, transform: Transform, direction: Direction) -> Self {
        Self {
            key: key.into(),
            transform,
            direction,
            weight: 1.0,
        }
    }
}

/// Configuration of [`ProxyOnly`]. Defaults are goodhart's own heuristic (not from a
/// paper): the five signals below with weight 1, EMA 0.3, a 30-observation warm-up,
/// threshold 4 and patience 3. On a synthetic entropy trace (N(2, 0.05) noise, then a
/// fall of 0.05/step) these fire 3 to 9 steps into the collapse over 300 seeds, with no
/// false alarm on 300 traces without collapse; its lead or lag on real runs is measured
/// with [`crate::evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyOnlyConfig {
    /// The signals. Default: KL acceleration (`kl/ref`, diff2, up), entropy collapse
    /// (`entropy`, level, down), ensemble disagreement growth
    /// (`reward/ensemble/disagreement`, level, up), length drift (`length/mean`, level,
    /// both), advantage distribution shift (`advantage/skew`, level, both).
    pub signals: Vec<SignalConfig>,
    /// EMA weight of a new raw value before the transform. Default 0.3.
    pub smoothing: f64,
    /// Transformed observations per signal forming its baseline (mean and std, frozen
    /// afterwards). Default 30.
    pub warmup: usize,
    /// Floor of a baseline std, so a constant warm-up does not divide by 0. Default 1e-6.
    pub min_std: f64,
    /// Score threshold. Default 4.
    pub threshold: f64,
    /// Consecutive scored steps above the threshold needed to fire. Default 3.
    pub patience: usize,
}

impl Default for ProxyOnlyConfig {
    fn default() -> Self {
        use Direction::*;
        use Transform::*;
        Self {
            signals: vec![
                SignalConfig::new(KEY_KL, Diff2, Up),
                SignalConfig::new(KEY_ENTROPY, Level, Down),
                SignalConfig::new(KEY_DISAGREEMENT, Level, Up),
                SignalConfig::new(KEY_LENGTH_MEAN, Level, Both),
                SignalConfig::new(KEY_ADVANTAGE_SKEW, Level, Both),
            ],
            smoothing: 0.3,
            warmup: 30,
            min_std: 1e-6,
            threshold: 4.0,
            patience: 3,
        }
    }
}

/// One signal as the proxy-only and CUSUM detectors read it: smoothed by an EMA,
/// transformed, and z-scored against the mean and std (floored) of its first `warmup`
/// transformed values, frozen afterwards.
#[derive(Debug, Clone, Default)]
pub(crate) struct Standardised {
    smoothed: Option<f64>,
    prev: VecDeque<f64>,
    baseline: Vec<f64>,
    frozen: Option<(f64, f64)>,
}

impl Standardised {
    /// Feeds one raw value; its z-score once the baseline is frozen, `None` before (and
    /// while a difference has too few values).
    pub(crate) fn push(
        &mut self,
        x: f64,
        smoothing: f64,
        transform: Transform,
        warmup: usize,
        min_std: f64,
    ) -> Option<f64> {
        let s = ema(self.smoothed, x, smoothing);
        self.smoothed = Some(s);
        let t = match (transform, self.prev.len()) {
            (Transform::Level, _) => Some(s),
            (Transform::Diff, n) if n >= 1 => Some(s - self.prev[n - 1]),
            (Transform::Diff2, n) if n >= 2 => Some(s - 2.0 * self.prev[n - 1] + self.prev[n - 2]),
            _ => None,
        };
        self.prev.push_back(s);
        if self.prev.len() > 2 {
            self.prev.pop_front();
        }
        let t = t?;
        match self.frozen {
            None => {
                self.baseline.push(t);
                if self.baseline.len() == warmup {
                    let n = self.baseline.len() as f64;
                    let m = self.baseline.iter().sum::<f64>() / n;
                    let sd = (self.baseline.iter().map(|v| (v - m).powi(2)).sum::<f64>()
                        / (n - 1.0))
                        .sqrt();
                    self.frozen = Some((m, sd.max(min_std)));
                    self.baseline = Vec::new();
                }
                None
            }
            Some((m, sd)) => Some((t - m) / sd.max(f64::MIN_POSITIVE)),
        }
    }
}

/// Proxy-only early-warning detector. For each signal: smooth the metric by an EMA, take
/// its level / first / second difference, z-score it against the mean and std of its
/// first `warmup` transformed values, orient it (`z`, `-z` or `|z|`). The score is the
/// weighted root mean square over the signals present at the step of
/// `max(oriented z, 0)`, `sqrt(sum_j w_j z_j+^2 / sum_j w_j)`: one signal alone must reach
/// `threshold * sqrt(k)` with `k` equally weighted signals present, corroborating signals
/// add up. It fires when the score is `>= threshold` for `patience` consecutive scored
/// steps.
#[derive(Debug, Clone)]
pub struct ProxyOnly {
    cfg: ProxyOnlyConfig,
    last_step: Option<u64>,
    states: Vec<Standardised>,
    streak: usize,
    score: Option<f64>,
    fired: Option<Firing>,
}

impl ProxyOnly {
    /// A detector with `cfg` (validated: at least one signal, positive finite weights,
    /// smoothing in (0, 1], warmup >= 2, patience >= 1, threshold > 0).
    pub fn new(cfg: ProxyOnlyConfig) -> Result<Self> {
        if cfg.signals.is_empty() {
            return Err(GoodhartError::Empty {
                what: "signals".into(),
            });
        }
        for s in &cfg.signals {
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return Err(GoodhartError::invalid(
                    format!("signals.{}.weight", s.key),
                    "must be finite and > 0",
                ));
            }
        }
        check_unit("smoothing", cfg.smoothing, false)?;
        check_non_negative("min_std", cfg.min_std)?;
        if cfg.warmup < 2 {
            return Err(GoodhartError::invalid(
                "warmup",
                "needs at least 2 observations for a std",
            ));
        }
        if cfg.patience == 0 {
            return Err(GoodhartError::invalid("patience", "must be at least 1"));
        }
        if !(cfg.threshold.is_finite() && cfg.threshold > 0.0) {
            return Err(GoodhartError::invalid(
                "threshold",
                "must be finite and > 0",
            ));
        }
        let states = vec![Standardised::default(); cfg.signals.len()];
        Ok(Self {
            cfg,
            last_step: None,
            states,
            streak: 0,
            score: None,
            fired: None,
        })
    }
}

impl Detector for ProxyOnly {
    fn name(&self) -> &'static str {
        "proxy-only"
    }

    fn update(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<Option<Firing>> {
        advance(&mut self.last_step, step)?;
        let mut contributions: Vec<(&str, f64, f64)> = Vec::new();
        for (sig, st) in self.cfg.signals.iter().zip(self.states.iter_mut()) {
            let Some(x) = read(metrics, &sig.key)? else {
                continue;
            };
            let c = &self.cfg;
            let Some(z) = st.push(x, c.smoothing, sig.transform, c.warmup, c.min_std) else {
                continue;
            };
            let oriented = match sig.direction {
                Direction::Up => z,
                Direction::Down => -z,
                Direction::Both => z.abs(),
            };
            contributions.push((&sig.key, sig.weight, oriented.max(0.0)));
        }
        if contributions.is_empty() {
            return Ok(None);
        }
        let wsum: f64 = contributions.iter().map(|c| c.1).sum();
        let score = (contributions.iter().map(|c| c.1 * c.2 * c.2).sum::<f64>() / wsum).sqrt();
        self.score = Some(score);
        self.streak = if score >= self.cfg.threshold {
            self.streak + 1
        } else {
            0
        };
        if self.fired.is_some() || self.streak < self.cfg.patience {
            return Ok(None);
        }
        let signals = contributions
            .iter()
            .map(|(k, _, z)| (k.to_string(), *z))
            .collect();
        contributions.sort_by(|a, b| b.2.total_cmp(&a.2));
        let parts: Vec<String> = contributions
            .iter()
            .take(3)
            .map(|(k, _, z)| format!("{k} z={z:.2}"))
            .collect();
        let firing = Firing {
            detector: self.name().into(),
            step,
            score,
            signals,
            reason: format!(
                "score {score:.2} >= {} for {} steps ({})",
                self.cfg.threshold,
                self.cfg.patience,
                parts.join(", ")
            ),
        };
        self.fired = Some(firing.clone());
        Ok(Some(firing))
    }

    fn fired(&self) -> Option<&Firing> {
        self.fired.as_ref()
    }

    fn score(&self) -> Option<f64> {
        self.score
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::normal;

    /// A synthetic run of `steps` steps: proxy rises 0.03/step; gold rises 0.02/step up to
    /// `peak` (if any) and falls 0.02/step after; `shape = saturating` gives
    /// `gold = 1 - exp(-t/25)` instead (no peak). Noise sd `sigma` on both.
    pub(crate) fn trace(
        seed: u64,
        steps: u64,
        peak: Option<u64>,
        saturating: bool,
        sigma: f64,
    ) -> Vec<BTreeMap<String, f64>> {
        let mut rng = goodhart_core::seed::rng(seed, "detect-trace");
        (0..steps)
            .map(|t| {
                let tf = t as f64;
                let gold = match (peak, saturating) {
                    (_, true) => 1.0 - (-tf / 25.0).exp(),
                    (Some(p), _) if t > p => 0.02 * p as f64 - 0.02 * (tf - p as f64),
                    _ => 0.02 * tf,
                };
                BTreeMap::from([
                    (
                        KEY_PROXY_MEAN.to_string(),
                        0.03 * tf + sigma * normal(&mut rng),
                    ),
                    (KEY_GOLD_MEAN.to_string(), gold + sigma * normal(&mut rng)),
                ])
            })
            .collect()
    }

    fn first_firing(det: &mut dyn Detector, run: &[BTreeMap<String, f64>]) -> Option<u64> {
        let mut at = None;
        for (t, m) in run.iter().enumerate() {
            if let Some(f) = det.update(t as u64, m).unwrap() {
                assert!(at.is_none(), "fires twice");
                at = Some(f.step);
            }
        }
        at
    }

    #[test]
    fn gold_aware_fires_within_five_steps_of_a_planted_peak() {
        // Clean trace: gold 0.02 t up to t = 50 (value 1.0), then down 0.02/step.
        // EMA (w .7) of a line lags by .02 * .3/.7: s_50 = .99143 (the peak);
        // s_51 = .7 * .98 + .3 s_50 = .98343, s_52 = .96703, s_53 = .94811, s_54 = .92843.
        // threshold = .05 * (.99143 - 0) = .04957 (the noise term, 2.5 x a mean of
        // residuals that are 0 before the turn, stays below .005):
        // drop at 53 = .04332 < threshold, at 54 = .06300 -> fires at 54.
        let mut det = GoldAware::new(GoldAwareConfig::default()).unwrap();
        assert_eq!(
            first_firing(&mut det, &trace(0, 100, Some(50), false, 0.0)),
            Some(54)
        );
        assert!(det.fired().unwrap().score >= 1.0);
        // Noisy (sd 0.01), 20 seeds: always within [50, 55].
        for seed in 0..20 {
            let mut det = GoldAware::new(GoldAwareConfig::default()).unwrap();
            let at = first_firing(&mut det, &trace(seed, 100, Some(50), false, 0.01));
            assert!(
                matches!(at, Some(s) if (50..=55).contains(&s)),
                "seed {seed}: {at:?}"
            );
        }
    }

    #[test]
    fn gold_aware_never_fires_without_a_peak() {
        for seed in 0..20 {
            for saturating in [false, true] {
                for sigma in [0.0, 0.01] {
                    let mut det = GoldAware::new(GoldAwareConfig::default()).unwrap();
                    let at = first_firing(&mut det, &trace(seed, 150, None, saturating, sigma));
                    assert_eq!(
                        at, None,
                        "seed {seed} saturating {saturating} sigma {sigma}"
                    );
                }
            }
        }
    }

    #[test]
    fn gold_aware_needs_the_proxy_to_rise_and_skips_missing_gold() {
        // gold peaks at 50 but the proxy falls too: not hacking, no firing.
        let mut run = trace(1, 100, Some(50), false, 0.0);
        for (t, m) in run.iter_mut().enumerate() {
            m.insert(KEY_PROXY_MEAN.into(), -(t as f64));
        }
        let mut det = GoldAware::new(GoldAwareConfig::default()).unwrap();
        assert_eq!(first_firing(&mut det, &run), None);
        // gold logged every other step only: still fires, at a step with gold.
        let mut run = trace(1, 100, Some(50), false, 0.0);
        for (t, m) in run.iter_mut().enumerate() {
            if t % 2 == 1 {
                m.remove(KEY_GOLD_MEAN);
            }
        }
        let mut det = GoldAware::new(GoldAwareConfig::default()).unwrap();
        let at = first_firing(&mut det, &run).unwrap();
        assert!(at.is_multiple_of(2) && (50..=60).contains(&at), "{at}");
    }

    #[test]
    fn detectors_reject_bad_input() {
        let mut det = GoldAware::new(GoldAwareConfig::default()).unwrap();
        let m = BTreeMap::from([(KEY_GOLD_MEAN.to_string(), f64::NAN)]);
        assert!(matches!(
            det.update(0, &m),
            Err(GoodhartError::NonFinite { .. })
        ));
        det.update(3, &BTreeMap::new()).unwrap();
        assert!(matches!(
            det.update(3, &BTreeMap::new()),
            Err(GoodhartError::InvalidArgument { .. })
        ));
        assert!(GoldAware::new(GoldAwareConfig {
            smoothing: 0.0,
            ..Default::default()
        })
        .is_err());
        assert!(GoldAware::new(GoldAwareConfig {
            rel_drop: -1.0,
            ..Default::default()
        })
        .is_err());
        assert!(ProxyOnly::new(ProxyOnlyConfig {
            signals: vec![],
            ..Default::default()
        })
        .is_err());
        assert!(ProxyOnly::new(ProxyOnlyConfig {
            warmup: 1,
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn proxy_only_fires_on_entropy_collapse_and_not_on_noise() {
        // entropy ~ N(2, 0.05) for 60 steps, then falls 0.05/step; other signals absent.
        let run = |seed: u64, collapse: bool| -> Vec<BTreeMap<String, f64>> {
            let mut rng = goodhart_core::seed::rng(seed, "entropy-trace");
            (0..120)
                .map(|t| {
                    let drift = if collapse && t > 60 {
                        0.05 * (t - 60) as f64
                    } else {
                        0.0
                    };
                    BTreeMap::from([(
                        KEY_ENTROPY.to_string(),
                        2.0 - drift + 0.05 * normal(&mut rng),
                    )])
                })
                .collect()
        };
        for seed in 0..10 {
            let mut det = ProxyOnly::new(ProxyOnlyConfig::default()).unwrap();
            let at = first_firing(&mut det, &run(seed, true)).expect("fires on collapse");
            // baseline std of the EMA(.3) of N(0, .05) is about .05 * sqrt(.3/1.7) = .021:
            // 4 z = .084 below 2, reached a few steps into the collapse (plus patience 3).
            assert!((61..=72).contains(&at), "seed {seed}: {at}");
            assert!(det.fired().unwrap().reason.contains("entropy"));
            let mut det = ProxyOnly::new(ProxyOnlyConfig::default()).unwrap();
            assert_eq!(
                first_firing(&mut det, &run(seed, false)),
                None,
                "seed {seed}"
            );
        }
        // a TOML-like config picks the detector by kind
        let cfg: DetectorConfig =
            serde_json::from_str(r#"{"kind": "gold-aware", "rel_drop": 0.1}"#).unwrap();
        assert_eq!(cfg.build().unwrap().name(), "gold-aware");
        assert!(
            serde_json::from_str::<DetectorConfig>(r#"{"kind": "gold-aware", "typo": 1}"#).is_err()
        );
    }
}
