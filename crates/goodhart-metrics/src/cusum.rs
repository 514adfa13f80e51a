//! The CUSUM change-point detector (Page 1954, "Continuous inspection schemes") on one
//! gold-free signal (`kind = "cusum"`).
//!
//! The signal is smoothed by an EMA, transformed (level, first or second difference, as
//! the proxy-only detector's signals), and standardised against the mean and standard
//! deviation of its first `warmup` transformed values: `z_t`. The one-sided sums
//!
//! ```text
//! S+_t = max(0, S+_{t-1} + z_t - k)      (direction up)
//! S-_t = max(0, S-_{t-1} - z_t - k)      (direction down)
//! ```
//!
//! (both for `both`) accumulate evidence of a shift of the mean by more than the drift
//! allowance `k` (in standard deviations); the detector fires at the first step where a
//! sum reaches the decision threshold `h`. Page's classical choice is `k` half the shift
//! to detect and `h` about 4 to 5; here `h` is what a corpus calibrates.

use std::collections::BTreeMap;

use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    detect::{
        advance, check_non_negative, check_unit, read, Detector, Direction, Firing, Standardised,
        Transform,
    },
    step::KEY_KL,
};

/// Configuration of [`Cusum`]. Defaults: the growth of `kl/ref` (its first difference,
/// upwards) after an EMA of 0.3, a 10-observation baseline, `k = 0.5`, `h = 5`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CusumConfig {
    /// The metric it watches.
    pub key: String,
    /// Level, velocity or acceleration of the smoothed metric.
    pub transform: Transform,
    /// Which shift counts.
    pub direction: Direction,
    /// EMA weight of a new raw value (1: no smoothing).
    pub smoothing: f64,
    /// Transformed observations forming the baseline (mean and std, frozen afterwards).
    pub warmup: usize,
    /// Floor of the baseline std.
    pub min_std: f64,
    /// The drift allowance `k`, in baseline standard deviations.
    pub drift: f64,
    /// The decision threshold `h`.
    pub threshold: f64,
}

impl Default for CusumConfig {
    fn default() -> Self {
        Self {
            key: KEY_KL.into(),
            transform: Transform::Diff,
            direction: Direction::Up,
            smoothing: 0.3,
            warmup: 10,
            min_std: 1e-6,
            drift: 0.5,
            threshold: 5.0,
        }
    }
}

/// The CUSUM detector (see the module docs). Score: the larger sum over `h`.
#[derive(Debug, Clone)]
pub struct Cusum {
    cfg: CusumConfig,
    last_step: Option<u64>,
    signal: Standardised,
    up: f64,
    down: f64,
    score: Option<f64>,
    fired: Option<Firing>,
}

impl Cusum {
    /// A detector with `cfg` (validated: smoothing in (0, 1], warmup >= 2, drift >= 0,
    /// threshold > 0, min_std >= 0).
    pub fn new(cfg: CusumConfig) -> Result<Self> {
        check_unit("smoothing", cfg.smoothing, false)?;
        check_non_negative("drift", cfg.drift)?;
        check_non_negative("min_std", cfg.min_std)?;
        if cfg.warmup < 2 {
            return Err(GoodhartError::invalid(
                "warmup",
                "needs at least 2 observations for a std",
            ));
        }
        if !(cfg.threshold.is_finite() && cfg.threshold > 0.0) {
            return Err(GoodhartError::invalid(
                "threshold",
                "must be finite and > 0",
            ));
        }
        Ok(Self {
            cfg,
            last_step: None,
            signal: Standardised::default(),
            up: 0.0,
            down: 0.0,
            score: None,
            fired: None,
        })
    }
}

impl Detector for Cusum {
    fn name(&self) -> &'static str {
        "cusum"
    }

    fn update(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<Option<Firing>> {
        advance(&mut self.last_step, step)?;
        let Some(x) = read(metrics, &self.cfg.key)? else {
            return Ok(None);
        };
        let c = &self.cfg;
        let Some(z) = self
            .signal
            .push(x, c.smoothing, c.transform, c.warmup, c.min_std)
        else {
            return Ok(None);
        };
        let k = self.cfg.drift;
        if self.cfg.direction != Direction::Down {
            self.up = (self.up + z - k).max(0.0);
        }
        if self.cfg.direction != Direction::Up {
            self.down = (self.down - z - k).max(0.0);
        }
        let sum = self.up.max(self.down);
        self.score = Some(sum / self.cfg.threshold);
        if self.fired.is_some() || sum < self.cfg.threshold {
            return Ok(None);
        }
        let side = if self.up >= self.down { "up" } else { "down" };
        let firing = Firing {
            detector: self.name().into(),
            step,
            score: sum / self.cfg.threshold,
            reason: format!(
                "CUSUM of `{}` ({side}) is {sum:.3} >= {} (drift {k}, z {z:.2})",
                self.cfg.key, self.cfg.threshold
            ),
            signals: [(self.cfg.key.clone(), sum)].into(),
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

    fn feed(det: &mut Cusum, values: &[f64]) -> Option<u64> {
        for (i, v) in values.iter().enumerate() {
            let m = BTreeMap::from([("x".to_string(), *v)]);
            if let Some(f) = det.update(i as u64, &m).unwrap() {
                return Some(f.step);
            }
        }
        None
    }

    fn cfg(direction: Direction) -> CusumConfig {
        CusumConfig {
            key: "x".into(),
            transform: Transform::Level,
            direction,
            smoothing: 1.0,
            warmup: 4,
            drift: 0.5,
            threshold: 5.0,
            ..Default::default()
        }
    }

    #[test]
    fn cusum_sums_by_hand() {
        // Baseline [0, 1, 0, 1]: mean 0.5, sd sqrt(1/3). Then 2.0 each step: z = 1.5 /
        // sqrt(1/3) = 2.598, S+ grows by z - 0.5 = 2.098: 2.098, 4.196, 6.294 -> fires at
        // the third value after the baseline (step 6).
        let mut up = Cusum::new(cfg(Direction::Up)).unwrap();
        let values = [0.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0];
        assert_eq!(feed(&mut up, &values), Some(6));
        let z = 1.5 / (1.0f64 / 3.0).sqrt();
        assert!((up.fired().unwrap().signals["x"] - 3.0 * (z - 0.5)).abs() < 1e-12);
        // The same rise never fires a detector of falls; a fall fires it.
        let mut down = Cusum::new(cfg(Direction::Down)).unwrap();
        assert_eq!(feed(&mut down, &values), None);
        let mut down = Cusum::new(cfg(Direction::Down)).unwrap();
        assert_eq!(
            feed(&mut down, &[0.0, 1.0, 0.0, 1.0, -1.0, -1.0, -1.0]),
            Some(6)
        );
        let mut both = Cusum::new(cfg(Direction::Both)).unwrap();
        assert_eq!(feed(&mut both, &values), Some(6));
        // Values within the baseline's spread: the sum stays under 5 (each z is +-0.866,
        // below the drift plus the reset at 0).
        let mut calm = Cusum::new(cfg(Direction::Up)).unwrap();
        let noise: Vec<f64> = (0..60).map(|i| (i % 2) as f64).collect();
        assert_eq!(feed(&mut calm, &noise), None);
        assert!(calm.score().unwrap() < 1.0);
    }

    #[test]
    fn cusum_settings_are_checked() {
        for bad in [
            CusumConfig {
                warmup: 1,
                ..cfg(Direction::Up)
            },
            CusumConfig {
                threshold: 0.0,
                ..cfg(Direction::Up)
            },
            CusumConfig {
                drift: -1.0,
                ..cfg(Direction::Up)
            },
            CusumConfig {
                smoothing: 0.0,
                ..cfg(Direction::Up)
            },
        ] {
            assert!(Cusum::new(bad).is_err());
        }
        let mut det = Cusum::new(cfg(Direction::Up)).unwrap();
        let nan = BTreeMap::from([("x".to_string(), f64::NAN)]);
        assert!(det.update(0, &nan).is_err());
    }
}
