//! The logistic detector (`kind = "logistic"`): a logistic regression over features of
//! gold-free signals, fitted on traces whose gold is known, that gives the probability that
//! a run is at or near its gold peak.
//!
//! Each feature reads one key. With `m_t` the mean of the key's last `window`
//! observations (fewer at the start) and `b` the mean of its first `window`:
//!
//! ```text
//! level   m_t
//! log     ln(max(m_t, 1e-4))
//! change  m_t - b
//! ratio   m_t / b
//! diff    m_t - m_{t - window}      (m_0 until `window` earlier means exist)
//! ```
//!
//! `p_t = 1 / (1 + exp(-(bias + sum_j weights[j] f_j(t))))`, and the detector fires at the
//! first step where every feature is defined (a `change` or `ratio` one once its baseline
//! is complete) and `p_t >= threshold`. A step that lacks any of the keys is skipped by
//! every feature.
//!
//! [`fit`] fits the weights and bias by Newton's method on standardised features with a
//! ridge penalty on the weights (not on the bias); [`feature_rows`] replays a logged run
//! through the features, so a fit sees exactly what the detector will. The defaults are
//! fitted by the detector corpus (`cargo xtask run detector-corpus`) on its calibration
//! traces: they hold for runs like those and are to be refitted for another task.

use std::collections::{BTreeMap, VecDeque};

use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    detect::{advance, read, Detector, Firing},
    evaluate::Run,
    step::{KEY_ADVANTAGE_SKEW, KEY_ENTROPY, KEY_KL, KEY_LENGTH_MEAN, KEY_PROXY_MEAN},
};

/// The floor of a `log` feature's argument (a KL estimate can be 0 or slightly negative).
pub const LOG_FLOOR: f64 = 1e-4;

/// How a feature is derived from its key's recent mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureTransform {
    /// The recent mean.
    Level,
    /// Its logarithm (floored at [`LOG_FLOOR`]).
    Log,
    /// The recent mean minus the mean of the first `window` observations.
    Change,
    /// The recent mean over the mean of the first `window` observations.
    Ratio,
    /// The recent mean minus the recent mean `window` observations earlier.
    Diff,
}

/// One feature of [`Logistic`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    /// The metric it reads.
    pub key: String,
    /// How it is derived.
    pub transform: FeatureTransform,
    /// Observations in its recent mean (and baseline).
    pub window: usize,
}

impl Feature {
    fn new(key: &str, transform: FeatureTransform, window: usize) -> Self {
        Self {
            key: key.into(),
            transform,
            window,
        }
    }

    /// Its name in a firing's signals: `key (transform, window)`.
    pub fn label(&self) -> String {
        let t = match self.transform {
            FeatureTransform::Level => "level",
            FeatureTransform::Log => "log",
            FeatureTransform::Change => "change",
            FeatureTransform::Ratio => "ratio",
            FeatureTransform::Diff => "diff",
        };
        format!("{} ({t}, {})", self.key, self.window)
    }
}

/// Configuration of [`Logistic`]. The default features are signals every RL run logs:
/// the KL to the reference (its log and its change over 5 steps), the advantages'
/// skewness (its level and its change from the start), the entropy, the proxy (its
/// change over 3 steps and from the start) and the length. The default weights, bias and
/// threshold are the detector corpus's fit on its calibration traces (docs/lab.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogisticConfig {
    /// The features, in the order of `weights`.
    pub features: Vec<Feature>,
    /// One weight per feature (a detector corpus fits them).
    pub weights: Vec<f64>,
    /// The intercept.
    pub bias: f64,
    /// The probability that fires it, in (0, 1).
    pub threshold: f64,
}

impl LogisticConfig {
    /// The default features (see the type's docs).
    pub fn default_features() -> Vec<Feature> {
        use FeatureTransform::*;
        vec![
            Feature::new(KEY_KL, Log, 1),
            Feature::new(KEY_KL, Diff, 5),
            Feature::new(KEY_ADVANTAGE_SKEW, Level, 5),
            Feature::new(KEY_ADVANTAGE_SKEW, Change, 5),
            Feature::new(KEY_ENTROPY, Ratio, 3),
            Feature::new(KEY_PROXY_MEAN, Diff, 3),
            Feature::new(KEY_PROXY_MEAN, Change, 3),
            Feature::new(KEY_LENGTH_MEAN, Ratio, 3),
        ]
    }

    /// The configuration with `weights` and `bias` (a fit), keeping the rest.
    pub fn with_fit(&self, weights: Vec<f64>, bias: f64) -> Self {
        Self {
            weights,
            bias,
            ..self.clone()
        }
    }

    fn check(&self) -> Result<()> {
        if self.features.is_empty() {
            return Err(GoodhartError::invalid("features", "is empty"));
        }
        for (i, f) in self.features.iter().enumerate() {
            if f.window == 0 {
                return Err(GoodhartError::invalid(
                    format!("features[{i}].window"),
                    "needs at least 1 observation",
                ));
            }
        }
        if self.weights.len() != self.features.len() {
            return Err(GoodhartError::invalid(
                "weights",
                format!(
                    "{} weight(s) for {} feature(s): give one per feature (a detector \
                     corpus fits them)",
                    self.weights.len(),
                    self.features.len()
                ),
            ));
        }
        if let Some(w) = self.weights.iter().find(|w| !w.is_finite()) {
            return Err(GoodhartError::invalid(
                "weights",
                format!("must be finite, got {w}"),
            ));
        }
        if !self.bias.is_finite() {
            return Err(GoodhartError::invalid("bias", "must be finite"));
        }
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(GoodhartError::invalid(
                "threshold",
                format!("is a probability in (0, 1), got {}", self.threshold),
            ));
        }
        Ok(())
    }
}

impl Default for LogisticConfig {
    /// The fit of `cargo xtask run detector-corpus` (the rule `logistic`), on its 38
    /// calibration traces that hacked or are clean controls.
    fn default() -> Self {
        Self {
            features: Self::default_features(),
            weights: vec![
                1.326657320415803,
                2.0006094972137283,
                -2.287406483249358,
                0.9962631510103775,
                -21.664902965444295,
                3.5463726914431293,
                0.7298695278265308,
                -1.3325092875902154,
            ],
            bias: 18.100271808951227,
            threshold: 0.6,
        }
    }
}

/// One feature's running state.
#[derive(Debug, Clone, Default)]
struct FeatureState {
    recent: VecDeque<f64>,
    /// The last `window + 1` recent means (for `diff`).
    means: VecDeque<f64>,
    baseline: Option<f64>,
}

/// The running state of a list of features, fed one step at a time.
#[derive(Debug, Clone)]
struct Features(Vec<FeatureState>);

impl Features {
    fn new(count: usize) -> Self {
        Self(vec![FeatureState::default(); count])
    }

    /// Feeds one step: `Ok(None)` when a key is missing (nothing is updated) or a feature
    /// is not yet defined, else the features' values.
    fn push(
        &mut self,
        features: &[Feature],
        metrics: &BTreeMap<String, f64>,
    ) -> Result<Option<Vec<f64>>> {
        let mut xs = Vec::with_capacity(features.len());
        for f in features {
            match read(metrics, &f.key)? {
                Some(x) => xs.push(x),
                None => return Ok(None),
            }
        }
        let mut out = Vec::with_capacity(xs.len());
        let mut ready = true;
        for ((f, s), x) in features.iter().zip(&mut self.0).zip(xs) {
            s.recent.push_back(x);
            if s.recent.len() > f.window {
                s.recent.pop_front();
            }
            let m = s.recent.iter().sum::<f64>() / s.recent.len() as f64;
            s.means.push_back(m);
            if s.means.len() > f.window + 1 {
                s.means.pop_front();
            }
            if s.baseline.is_none() && s.recent.len() == f.window {
                s.baseline = Some(m);
            }
            let value = match f.transform {
                FeatureTransform::Level => Some(m),
                FeatureTransform::Log => Some(m.max(LOG_FLOOR).ln()),
                FeatureTransform::Diff => Some(m - s.means[0]),
                FeatureTransform::Change => s.baseline.map(|b| m - b),
                FeatureTransform::Ratio => {
                    if s.baseline == Some(0.0) {
                        return Err(GoodhartError::invalid(
                            format!("feature `{}`", f.label()),
                            "a ratio to a baseline mean of 0",
                        ));
                    }
                    s.baseline.map(|b| m / b)
                }
            };
            match value {
                Some(v) => out.push(v),
                None => ready = false,
            }
        }
        Ok(ready.then_some(out))
    }
}

/// The features of `features` at every step of `run` where all are defined, as
/// `(step, values)`: the rows [`fit`] learns from, as the detector sees them online.
pub fn feature_rows(features: &[Feature], run: &Run) -> Result<Vec<(u64, Vec<f64>)>> {
    let mut state = Features::new(features.len());
    let mut rows = Vec::new();
    for (step, metrics) in &run.steps {
        if let Some(x) = state.push(features, metrics)? {
            rows.push((*step, x));
        }
    }
    Ok(rows)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Fits `P(y = 1 | x) = sigmoid(bias + w . x)` to `rows` and `labels`: Newton's method on
/// the features standardised by their mean and (population) standard deviation over the
/// rows, minimising the negative log-likelihood plus `l2 / 2 |w|^2` on the standardised
/// weights; returns the weights and bias on the original scale.
///
/// Errors when the rows are empty or ragged, a value is not finite, the labels are all one
/// class, `l2` is negative or not finite, or a feature is constant over the rows.
pub fn fit(rows: &[Vec<f64>], labels: &[bool], l2: f64) -> Result<(Vec<f64>, f64)> {
    let n = rows.len();
    let k = rows.first().map_or(0, Vec::len);
    if n == 0 || k == 0 {
        return Err(GoodhartError::Empty {
            what: "rows to fit".into(),
        });
    }
    if labels.len() != n || rows.iter().any(|r| r.len() != k) {
        return Err(GoodhartError::invalid(
            "rows",
            "every row needs one value per feature and one label",
        ));
    }
    if rows.iter().flatten().any(|v| !v.is_finite()) {
        return Err(GoodhartError::NonFinite {
            what: "a feature value".into(),
        });
    }
    if !(l2.is_finite() && l2 >= 0.0) {
        return Err(GoodhartError::invalid(
            "l2",
            format!("must be finite and >= 0, got {l2}"),
        ));
    }
    let positives = labels.iter().filter(|y| **y).count();
    if positives == 0 || positives == n {
        return Err(GoodhartError::invalid(
            "labels",
            "all of one class: nothing to separate",
        ));
    }
    let mean: Vec<f64> = (0..k)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let sd: Vec<f64> = (0..k)
        .map(|j| (rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n as f64).sqrt())
        .collect();
    if let Some(j) = sd.iter().position(|s| !s.is_normal()) {
        return Err(GoodhartError::invalid(
            format!("features[{j}]"),
            "is constant over the rows: it cannot be standardised",
        ));
    }
    // Standardised rows with a trailing 1 for the bias.
    let z: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            let mut z: Vec<f64> = (0..k).map(|j| (r[j] - mean[j]) / sd[j]).collect();
            z.push(1.0);
            z
        })
        .collect();
    let d = k + 1;
    let mut w = vec![0.0; d];
    for _ in 0..100 {
        let mut grad: Vec<f64> = (0..d)
            .map(|j| if j < k { l2 * w[j] } else { 0.0 })
            .collect();
        let mut hess = vec![vec![0.0; d]; d];
        for (j, row) in hess.iter_mut().enumerate().take(k) {
            row[j] = l2;
        }
        for (zi, yi) in z.iter().zip(labels) {
            let p = sigmoid(zi.iter().zip(&w).map(|(a, b)| a * b).sum());
            let r = p - f64::from(u8::from(*yi));
            let c = p * (1.0 - p);
            for a in 0..d {
                grad[a] += r * zi[a];
                for b in 0..=a {
                    hess[a][b] += c * zi[a] * zi[b];
                }
            }
        }
        let step = cholesky_solve(hess, &grad)?;
        for (wj, s) in w.iter_mut().zip(&step) {
            *wj -= s;
        }
        if step.iter().all(|s| s.abs() < 1e-10) {
            break;
        }
    }
    let weights: Vec<f64> = (0..k).map(|j| w[j] / sd[j]).collect();
    let bias = w[k] - (0..k).map(|j| w[j] * mean[j] / sd[j]).sum::<f64>();
    Ok((weights, bias))
}

/// Solves `A x = b` for a symmetric positive definite `A` of which the lower triangle is
/// filled.
fn cholesky_solve(mut a: Vec<Vec<f64>>, b: &[f64]) -> Result<Vec<f64>> {
    let d = b.len();
    for j in 0..d {
        let s = a[j][j] - (0..j).map(|k| a[j][k] * a[j][k]).sum::<f64>();
        if s.is_nan() || s <= 0.0 {
            return Err(GoodhartError::invalid(
                "rows",
                "the fit's Hessian is singular (separable or degenerate features; use l2 > 0)",
            ));
        }
        a[j][j] = s.sqrt();
        for i in j + 1..d {
            let s = a[i][j] - (0..j).map(|k| a[i][k] * a[j][k]).sum::<f64>();
            a[i][j] = s / a[j][j];
        }
    }
    let mut y = vec![0.0; d];
    for i in 0..d {
        y[i] = (b[i] - (0..i).map(|k| a[i][k] * y[k]).sum::<f64>()) / a[i][i];
    }
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        x[i] = (y[i] - (i + 1..d).map(|k| a[k][i] * x[k]).sum::<f64>()) / a[i][i];
    }
    Ok(x)
}

/// The logistic detector (see the module docs). Score: `p_t / threshold`.
#[derive(Debug, Clone)]
pub struct Logistic {
    cfg: LogisticConfig,
    state: Features,
    last_step: Option<u64>,
    score: Option<f64>,
    fired: Option<Firing>,
}

impl Logistic {
    /// A detector with `cfg` (validated: features non-empty with windows >= 1, one finite
    /// weight per feature, a finite bias, a threshold in (0, 1)).
    pub fn new(cfg: LogisticConfig) -> Result<Self> {
        cfg.check()?;
        Ok(Self {
            state: Features::new(cfg.features.len()),
            cfg,
            last_step: None,
            score: None,
            fired: None,
        })
    }
}

impl Detector for Logistic {
    fn name(&self) -> &'static str {
        "logistic"
    }

    fn update(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<Option<Firing>> {
        advance(&mut self.last_step, step)?;
        let Some(x) = self.state.push(&self.cfg.features, metrics)? else {
            return Ok(None);
        };
        let c = &self.cfg;
        let parts: Vec<f64> = x.iter().zip(&c.weights).map(|(x, w)| x * w).collect();
        let p = sigmoid(c.bias + parts.iter().sum::<f64>());
        self.score = Some(p / c.threshold);
        if self.fired.is_some() || p < c.threshold {
            return Ok(None);
        }
        let firing = Firing {
            detector: self.name().into(),
            step,
            score: p / c.threshold,
            reason: format!(
                "the logistic model's probability {p:.3} >= {} over {} features",
                c.threshold,
                c.features.len()
            ),
            signals: c
                .features
                .iter()
                .zip(&parts)
                .map(|(f, v)| (f.label(), *v))
                .collect(),
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
mod tests {
    use super::*;
    use FeatureTransform::*;

    fn run(rows: &[&[(&str, f64)]]) -> Run {
        Run::from_rows(
            "r",
            rows.iter()
                .map(|r| r.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .collect(),
        )
    }

    #[test]
    fn features_by_hand() {
        // x = 1, 3, 2, 6, 4: means of the last 2 are 1, 2, 2.5, 4, 5; the baseline (the
        // first 2) is 2, complete at step 1, so rows start there.
        let xs = [1.0, 3.0, 2.0, 6.0, 4.0];
        let ys = [0.0, -1.0, std::f64::consts::E, 1.0, 1.0];
        let rows: Vec<Vec<(&str, f64)>> = xs
            .iter()
            .zip(&ys)
            .map(|(x, y)| vec![("x", *x), ("y", *y)])
            .collect();
        let refs: Vec<&[(&str, f64)]> = rows.iter().map(Vec::as_slice).collect();
        let features = [
            Feature::new("x", Level, 2),
            Feature::new("x", Change, 2),
            Feature::new("x", Ratio, 2),
            // m_t - m_{t-2}, m_0 = 1 until two earlier means exist.
            Feature::new("x", Diff, 2),
            Feature::new("y", Log, 1),
        ];
        let got = feature_rows(&features, &run(&refs)).unwrap();
        let floor = LOG_FLOOR.ln();
        let want: Vec<(u64, Vec<f64>)> = vec![
            (1, vec![2.0, 0.0, 1.0, 1.0, floor]),
            (2, vec![2.5, 0.5, 1.25, 1.5, 1.0]),
            (3, vec![4.0, 2.0, 2.0, 2.0, 0.0]),
            (4, vec![5.0, 3.0, 2.5, 2.5, 0.0]),
        ];
        assert_eq!(got.len(), want.len());
        for ((s, g), (t, w)) in got.iter().zip(&want) {
            assert_eq!(s, t);
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() < 1e-12, "step {s}: {g:?} vs {w:?}");
            }
        }
        // A step without `y` is skipped by every feature: the rows are those of the run
        // without it, at their own steps.
        let mut gapped = run(&refs);
        gapped
            .steps
            .insert(2, (2, BTreeMap::from([("x".to_string(), 100.0)])));
        for (i, s) in gapped.steps.iter_mut().enumerate() {
            s.0 = i as u64;
        }
        let skipped = feature_rows(&features, &gapped).unwrap();
        let steps: Vec<u64> = skipped.iter().map(|r| r.0).collect();
        assert_eq!(steps, vec![1, 3, 4, 5]);
        for (a, b) in skipped.iter().zip(&got) {
            assert_eq!(a.1, b.1);
        }
    }

    #[test]
    fn the_fit_by_hand_and_its_first_order_conditions() {
        // One binary feature, no penalty: the fitted probabilities are the classes' label
        // means, 1/2 at x = 0 and 2/3 at x = 1, so bias = logit(1/2) = 0 and w = ln 2.
        let rows = vec![vec![0.0], vec![0.0], vec![1.0], vec![1.0], vec![1.0]];
        let labels = [false, true, true, true, false];
        let (w, b) = fit(&rows, &labels, 0.0).unwrap();
        assert!(b.abs() < 1e-9, "{b}");
        assert!((w[0] - 2f64.ln()).abs() < 1e-9, "{w:?}");
        // Three features with a penalty: at the optimum the gradient vanishes. The bias is
        // not penalised, so the mean probability equals the share of positives; on the
        // standardised scale, sum_i (p_i - y_i) z_ij = -l2 w_j.
        let rows: Vec<Vec<f64>> = (0..60)
            .map(|i| {
                let t = i as f64;
                vec![
                    (t * 0.37).sin() * 3.0,
                    t / 10.0,
                    ((t * 1.3).cos() + 2.0).ln(),
                ]
            })
            .collect();
        let labels: Vec<bool> = (0..60).map(|i| (i * 7 % 11) < 4 + i / 12).collect();
        let l2 = 2.0;
        let (w, b) = fit(&rows, &labels, l2).unwrap();
        let p: Vec<f64> = rows
            .iter()
            .map(|r| sigmoid(b + r.iter().zip(&w).map(|(x, w)| x * w).sum::<f64>()))
            .collect();
        let y: Vec<f64> = labels.iter().map(|y| f64::from(u8::from(*y))).collect();
        let share = y.iter().sum::<f64>() / 60.0;
        assert!((p.iter().sum::<f64>() / 60.0 - share).abs() < 1e-9);
        for j in 0..3 {
            let mean = rows.iter().map(|r| r[j]).sum::<f64>() / 60.0;
            let sd = (rows.iter().map(|r| (r[j] - mean).powi(2)).sum::<f64>() / 60.0).sqrt();
            let grad: f64 = (0..60)
                .map(|i| (p[i] - y[i]) * (rows[i][j] - mean) / sd)
                .sum();
            assert!((grad + l2 * w[j] * sd).abs() < 1e-8, "feature {j}: {grad}");
        }
    }

    #[test]
    fn it_fires_at_the_first_step_past_the_threshold() {
        // p = sigmoid(x - 2) over the level of x (window 1): p >= 0.5 once x >= 2.
        let cfg = LogisticConfig {
            features: vec![Feature::new("x", Level, 1)],
            weights: vec![1.0],
            bias: -2.0,
            threshold: 0.5,
        };
        let mut det = Logistic::new(cfg.clone()).unwrap();
        let mut fired = None;
        for (i, x) in [0.0, 1.0, 1.5, 2.5, 0.0, 3.0].iter().enumerate() {
            let m = BTreeMap::from([("x".to_string(), *x)]);
            if let Some(f) = det.update(i as u64, &m).unwrap() {
                assert!(fired.is_none(), "fires once");
                fired = Some(f);
            }
        }
        let f = fired.unwrap();
        assert_eq!(f.step, 3);
        assert!((f.score - sigmoid(0.5) / 0.5).abs() < 1e-12);
        assert_eq!(f.signals["x (level, 1)"], 2.5);
        // Its score after the firing is still p / threshold: sigmoid(1) / 0.5.
        assert!((det.score().unwrap() - sigmoid(1.0) / 0.5).abs() < 1e-12);
        // A higher threshold waits for x >= 2 + logit(0.7) = 2.847: step 5.
        let high = LogisticConfig {
            threshold: 0.7,
            ..cfg
        };
        let steps: Vec<BTreeMap<String, f64>> = [0.0, 1.0, 1.5, 2.5, 0.0, 3.0]
            .iter()
            .map(|x| BTreeMap::from([("x".to_string(), *x)]))
            .collect();
        let r = Run::from_rows("r", steps);
        let f = crate::evaluate::first_firing(&r, Box::new(Logistic::new(high).unwrap()));
        assert_eq!(f.unwrap(), Some(5));
    }

    #[test]
    fn bad_settings_and_inputs_are_errors() {
        let ok = LogisticConfig {
            features: vec![Feature::new("x", Ratio, 2)],
            weights: vec![1.0],
            bias: 0.0,
            threshold: 0.5,
        };
        assert!(Logistic::new(ok.clone()).is_ok());
        for bad in [
            LogisticConfig {
                features: vec![],
                weights: vec![],
                ..ok.clone()
            },
            LogisticConfig {
                weights: vec![],
                ..ok.clone()
            },
            LogisticConfig {
                weights: vec![f64::NAN],
                ..ok.clone()
            },
            LogisticConfig {
                features: vec![Feature::new("x", Level, 0)],
                ..ok.clone()
            },
            LogisticConfig {
                threshold: 1.0,
                ..ok.clone()
            },
            LogisticConfig {
                bias: f64::INFINITY,
                ..ok.clone()
            },
        ] {
            assert!(Logistic::new(bad).is_err());
        }
        let e = Logistic::new(LogisticConfig {
            weights: vec![],
            ..ok.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("weights") && e.contains("1 feature"), "{e}");
        // A ratio to a zero baseline, a NaN and a repeated step are errors.
        let mut det = Logistic::new(ok.clone()).unwrap();
        let zero = BTreeMap::from([("x".to_string(), 0.0)]);
        det.update(0, &zero).unwrap();
        let e = det.update(1, &zero).unwrap_err().to_string();
        assert!(e.contains("x (ratio, 2)"), "{e}");
        let mut det = Logistic::new(ok).unwrap();
        let nan = BTreeMap::from([("x".to_string(), f64::NAN)]);
        assert!(det.update(0, &nan).is_err());
        det.update(1, &BTreeMap::new()).unwrap();
        assert!(det.update(1, &BTreeMap::new()).is_err());
        // The fit refuses one class, ragged rows and constant features.
        assert!(fit(&[vec![0.0], vec![1.0]], &[true, true], 1.0).is_err());
        assert!(fit(&[vec![0.0], vec![1.0, 2.0]], &[true, false], 1.0).is_err());
        let e = fit(&[vec![1.0, 0.0], vec![1.0, 1.0]], &[true, false], 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("features[0]"), "{e}");
    }
}
