//! The shift detector (`kind = "shift"`): fires when one gold-free signal's recent mean
//! has moved from its starting level by a fixed amount, in the signal's own units.
//!
//! ```text
//! b   = mean of the first `warmup` observations of `key`
//! m_t = mean of the last `window` observations (the baseline's included, early on)
//! shift_t = m_t - b (direction up), b - m_t (down), |m_t - b| (both)
//! ```
//!
//! It fires at the first observation after the baseline with `shift_t >= threshold`.
//! Unlike [`crate::cusum::Cusum`] it does not divide by the baseline's spread, so a short
//! baseline (a run that may hack within ten steps) does not set its scale; the threshold
//! is in the signal's units, which suits signals whose scale does not depend on the run
//! (the advantages' skewness, an entropy, a KL), and is what a corpus calibrates.

use std::collections::{BTreeMap, VecDeque};

use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    detect::{advance, read, Detector, Direction, Firing},
    step::KEY_ADVANTAGE_SKEW,
};

/// Configuration of [`Shift`]. Defaults (goodhart's own): the skewness of the batch's
/// advantages (`advantage/skew`) falling by 0.5 from the mean of its first 5
/// observations, read as the mean of the last 5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShiftConfig {
    /// The metric it watches.
    pub key: String,
    /// Which shift counts.
    pub direction: Direction,
    /// Observations forming the baseline (their mean, frozen afterwards).
    pub warmup: usize,
    /// Observations averaged for the current level.
    pub window: usize,
    /// The shift that fires it, in the metric's units.
    pub threshold: f64,
}

impl Default for ShiftConfig {
    fn default() -> Self {
        Self {
            key: KEY_ADVANTAGE_SKEW.into(),
            direction: Direction::Down,
            warmup: 5,
            window: 5,
            threshold: 0.5,
        }
    }
}

/// The shift detector (see the module docs). Score: the shift over the threshold.
#[derive(Debug, Clone)]
pub struct Shift {
    cfg: ShiftConfig,
    last_step: Option<u64>,
    /// The sum and count of the baseline's observations so far.
    baseline: (f64, usize),
    recent: VecDeque<f64>,
    score: Option<f64>,
    fired: Option<Firing>,
}

impl Shift {
    /// A detector with `cfg` (validated: warmup >= 1, window >= 1, threshold finite and
    /// > 0).
    pub fn new(cfg: ShiftConfig) -> Result<Self> {
        for (name, v) in [("warmup", cfg.warmup), ("window", cfg.window)] {
            if v == 0 {
                return Err(GoodhartError::invalid(name, "needs at least 1 observation"));
            }
        }
        if !(cfg.threshold.is_finite() && cfg.threshold > 0.0) {
            return Err(GoodhartError::invalid(
                "threshold",
                format!("must be finite and > 0, got {}", cfg.threshold),
            ));
        }
        Ok(Self {
            cfg,
            last_step: None,
            baseline: (0.0, 0),
            recent: VecDeque::new(),
            score: None,
            fired: None,
        })
    }
}

impl Detector for Shift {
    fn name(&self) -> &'static str {
        "shift"
    }

    fn update(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<Option<Firing>> {
        advance(&mut self.last_step, step)?;
        let Some(x) = read(metrics, &self.cfg.key)? else {
            return Ok(None);
        };
        let c = &self.cfg;
        self.recent.push_back(x);
        if self.recent.len() > c.window {
            self.recent.pop_front();
        }
        let (sum, n) = &mut self.baseline;
        if *n < c.warmup {
            *sum += x;
            *n += 1;
            return Ok(None);
        }
        let b = *sum / *n as f64;
        let m = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        let shift = match c.direction {
            Direction::Up => m - b,
            Direction::Down => b - m,
            Direction::Both => (m - b).abs(),
        };
        let score = shift / c.threshold;
        self.score = Some(score);
        if self.fired.is_some() || shift < c.threshold {
            return Ok(None);
        }
        let firing = Firing {
            detector: self.name().into(),
            step,
            score,
            reason: format!(
                "`{}` moved {shift:.3} >= {} from its first {} observations' mean {b:.3} \
                 (mean of the last {}: {m:.3})",
                c.key,
                c.threshold,
                c.warmup,
                self.recent.len()
            ),
            signals: [(c.key.clone(), shift)].into(),
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

    fn feed(det: &mut Shift, values: &[Option<f64>]) -> Option<u64> {
        for (i, v) in values.iter().enumerate() {
            let m = v.map_or_else(BTreeMap::new, |v| BTreeMap::from([("x".to_string(), v)]));
            if let Some(f) = det.update(i as u64, &m).unwrap() {
                return Some(f.step);
            }
        }
        None
    }

    fn cfg(direction: Direction) -> ShiftConfig {
        ShiftConfig {
            key: "x".into(),
            direction,
            warmup: 3,
            window: 2,
            threshold: 1.0,
        }
    }

    fn some(xs: &[f64]) -> Vec<Option<f64>> {
        xs.iter().copied().map(Some).collect()
    }

    #[test]
    fn shift_by_hand() {
        // Baseline [0, 1, 2]: mean 1. Then the means of the last two: (2 + 1.5) / 2 =
        // 1.75, (1.5 + 2.5) / 2 = 2.0 -> a shift of 1.0 at step 4.
        let values = some(&[0.0, 1.0, 2.0, 1.5, 2.5, 9.0]);
        let mut up = Shift::new(cfg(Direction::Up)).unwrap();
        assert_eq!(feed(&mut up, &values), Some(4));
        let f = up.fired().unwrap();
        assert_eq!(f.signals["x"], 1.0);
        assert_eq!(f.score, 1.0);
        // Later values are not read once it fired, and it fires once.
        assert!(up
            .update(10, &BTreeMap::from([("x".to_string(), 50.0)]))
            .unwrap()
            .is_none());
        assert_eq!(up.fired().unwrap().step, 4);
        // The same rise never fires a detector of falls; a fall fires it and `both`.
        let mut down = Shift::new(cfg(Direction::Down)).unwrap();
        assert_eq!(feed(&mut down, &values), None);
        // Its score at the end: (1 - (2.5 + 9) / 2) / 1.
        assert_eq!(down.score(), Some(-4.75));
        let fall = some(&[0.0, 1.0, 2.0, 0.5, -0.5, -1.0]);
        let mut down = Shift::new(cfg(Direction::Down)).unwrap();
        // Means of the last two: 1.25, 0.0 (a shift of 1.0) -> step 4.
        assert_eq!(feed(&mut down, &fall), Some(4));
        let mut both = Shift::new(cfg(Direction::Both)).unwrap();
        assert_eq!(feed(&mut both, &fall), Some(4));
        // Within the threshold: never.
        let mut calm = Shift::new(cfg(Direction::Both)).unwrap();
        let noise: Vec<f64> = (0..60).map(|i| (i % 3) as f64).collect();
        assert_eq!(feed(&mut calm, &some(&noise)), None);
        assert!(calm.score().unwrap() < 1.0);
    }

    #[test]
    fn missing_values_are_skipped_not_counted() {
        // The baseline is the first three observations, wherever they fall (mean 1); steps
        // without the key neither fill it nor move the window: the means of the last two
        // are 1.75 at step 6 and 2.0 at step 7.
        let values = [
            None,
            Some(0.0),
            None,
            Some(1.0),
            Some(2.0),
            None,
            Some(1.5),
            Some(2.5),
        ];
        let mut up = Shift::new(cfg(Direction::Up)).unwrap();
        assert_eq!(feed(&mut up, &values), Some(7));
    }

    #[test]
    fn shift_settings_are_checked() {
        for bad in [
            ShiftConfig {
                warmup: 0,
                ..cfg(Direction::Up)
            },
            ShiftConfig {
                window: 0,
                ..cfg(Direction::Up)
            },
            ShiftConfig {
                threshold: 0.0,
                ..cfg(Direction::Up)
            },
            ShiftConfig {
                threshold: f64::NAN,
                ..cfg(Direction::Up)
            },
        ] {
            assert!(Shift::new(bad).is_err());
        }
        let mut det = Shift::new(cfg(Direction::Up)).unwrap();
        let nan = BTreeMap::from([("x".to_string(), f64::NAN)]);
        assert!(det.update(0, &nan).is_err());
        det.update(3, &BTreeMap::new()).unwrap();
        assert!(det.update(3, &BTreeMap::new()).is_err());
    }
}
