//! Coefficient controllers: how a regulariser's strength `beta` evolves over training.
//!
//! | kind | update after each step | source |
//! |---|---|---|
//! | `fixed` | none | verl `FixedKLController`, TRL |
//! | `adaptive` | `e = clip(KL/target - 1, -0.2, 0.2)`, `beta <- beta (1 + e n_steps / horizon)` | Ziegler et al. 2019; verl `AdaptiveKLController` (target 0.1, horizon 10000) |
//! | `reward_adaptive` | `beta = beta_min + (beta_max - beta_min) * clip((r_ema - r_start)/(r_target - r_start), 0, 1)` | CRD *(unverified: goodhart's schedule)* |
//! | `lagrangian` | `beta <- max(0, beta + lr (KL - target))` | dual ascent on `KL <= target` |

use serde::{Deserialize, Serialize};

use goodhart_core::{GoodhartError, Result};

/// Config of a coefficient controller (`kind = "fixed" | "adaptive" | "reward_adaptive" |
/// "lagrangian"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControllerConfig {
    /// A constant coefficient.
    Fixed {
        /// The coefficient (default 0.001, verl's `kl_loss_coef` / `kl_ctrl.kl_coef`).
        #[serde(default = "default_coef")]
        coef: f64,
    },
    /// Ziegler et al.'s proportional controller towards a target KL.
    Adaptive {
        /// Initial coefficient (default 0.001, verl).
        #[serde(default = "default_coef")]
        init_coef: f64,
        /// Target KL (default 0.1, verl `kl_ctrl.target_kl`).
        #[serde(default = "default_target")]
        target: f64,
        /// Horizon in samples (default 10000, verl `kl_ctrl.horizon`).
        #[serde(default = "default_horizon")]
        horizon: f64,
    },
    /// Coefficient scheduled by reward progress (CRD; *unverified*, see
    /// [`Controller::update`]): loose while the proxy reward is low, tight once it nears
    /// `reward_target`, where over-optimisation begins.
    RewardAdaptive {
        /// Coefficient at (or below) `reward_start`.
        beta_min: f64,
        /// Coefficient at (or above) `reward_target`.
        beta_max: f64,
        /// Reward at which tightening starts.
        reward_start: f64,
        /// Reward at which the coefficient reaches `beta_max`.
        reward_target: f64,
        /// EMA smoothing of the batch reward, `r_ema <- s r_ema + (1-s) r` (default 0.9).
        #[serde(default = "default_smoothing")]
        smoothing: f64,
    },
    /// Dual ascent on the constraint `KL <= target`.
    Lagrangian {
        /// Initial multiplier.
        #[serde(default = "default_coef")]
        init_coef: f64,
        /// KL budget.
        #[serde(default = "default_target")]
        target: f64,
        /// Dual step size (default 0.1, the SGD rate of constrained RLHF).
        #[serde(default = "default_dual_lr")]
        lr: f64,
    },
}

fn default_coef() -> f64 {
    0.001
}
fn default_target() -> f64 {
    0.1
}
fn default_horizon() -> f64 {
    10_000.0
}
fn default_smoothing() -> f64 {
    0.9
}
fn default_dual_lr() -> f64 {
    0.1
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self::Fixed {
            coef: default_coef(),
        }
    }
}

fn require(name: &str, ok: bool, value: f64, rule: &str) -> Result<()> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            name,
            format!("must be {rule}, got {value}"),
        ))
    }
}

impl ControllerConfig {
    /// Validates the parameters and returns the controller at its initial coefficient.
    pub fn init(&self) -> Result<Controller> {
        let value = match *self {
            Self::Fixed { coef } => {
                require("coef", coef >= 0.0, coef, ">= 0")?;
                coef
            }
            Self::Adaptive {
                init_coef,
                target,
                horizon,
            } => {
                require("init_coef", init_coef >= 0.0, init_coef, ">= 0")?;
                require("target", target > 0.0, target, "> 0")?;
                require("horizon", horizon > 0.0, horizon, "> 0")?;
                init_coef
            }
            Self::RewardAdaptive {
                beta_min,
                beta_max,
                reward_start,
                reward_target,
                smoothing,
            } => {
                require("beta_min", beta_min >= 0.0, beta_min, ">= 0")?;
                require("beta_max", beta_max >= beta_min, beta_max, ">= beta_min")?;
                require("reward_start", true, reward_start, "finite")?;
                require(
                    "reward_target",
                    reward_target > reward_start,
                    reward_target,
                    "> reward_start",
                )?;
                require(
                    "smoothing",
                    (0.0..1.0).contains(&smoothing),
                    smoothing,
                    "in [0, 1)",
                )?;
                beta_min
            }
            Self::Lagrangian {
                init_coef,
                target,
                lr,
            } => {
                require("init_coef", init_coef >= 0.0, init_coef, ">= 0")?;
                require("target", target >= 0.0, target, ">= 0")?;
                require("lr", lr > 0.0, lr, "> 0")?;
                init_coef
            }
        };
        Ok(Controller {
            config: self.clone(),
            value,
            reward_ema: None,
        })
    }
}

/// A coefficient controller's state; [`Controller::value`] is the current `beta`.
#[derive(Debug, Clone, PartialEq)]
pub struct Controller {
    config: ControllerConfig,
    value: f64,
    reward_ema: Option<f64>,
}

/// What a controller observes after a step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ControllerObservation {
    /// Mean KL to the reference over the batch (per token or per sequence, as the
    /// target was set).
    pub kl: f64,
    /// Mean (proxy) reward of the batch.
    pub reward: f64,
    /// Number of samples in the step (verl passes the batch size).
    pub n_steps: f64,
}

impl Controller {
    /// The current coefficient.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Multiplies the current coefficient by `factor` (finite, >= 0; otherwise unchanged);
    /// later updates go on from the new value.
    pub fn scale(&mut self, factor: f64) {
        if factor.is_finite() && factor >= 0.0 {
            self.value *= factor;
        }
    }

    /// The config it was built from.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Updates the coefficient after a step and returns it. Errors on a non-finite
    /// observation (the state is left unchanged).
    ///
    /// - `adaptive`: `beta *= 1 + clip(kl/target - 1, -0.2, 0.2) n_steps / horizon` (verl).
    /// - `reward_adaptive` *(unverified schedule, goodhart's own)*: `r_ema` starts at the
    ///   first batch reward, then `r_ema <- s r_ema + (1-s) r`; the progress
    ///   `p = clip((r_ema - reward_start)/(reward_target - reward_start), 0, 1)` sets
    ///   `beta = beta_min + (beta_max - beta_min) p`.
    /// - `lagrangian`: `beta <- max(0, beta + lr (kl - target))`: a KL above budget raises
    ///   `beta`, below budget lowers it.
    pub fn update(&mut self, obs: ControllerObservation) -> Result<f64> {
        for (name, v) in [
            ("kl", obs.kl),
            ("reward", obs.reward),
            ("n_steps", obs.n_steps),
        ] {
            if !v.is_finite() {
                return Err(GoodhartError::NonFinite {
                    what: format!("controller observation `{name}`"),
                });
            }
        }
        match self.config {
            ControllerConfig::Fixed { .. } => {}
            ControllerConfig::Adaptive {
                target, horizon, ..
            } => {
                let e = (obs.kl / target - 1.0).clamp(-0.2, 0.2);
                self.value *= 1.0 + e * obs.n_steps / horizon;
            }
            ControllerConfig::RewardAdaptive {
                beta_min,
                beta_max,
                reward_start,
                reward_target,
                smoothing,
            } => {
                let ema = match self.reward_ema {
                    None => obs.reward,
                    Some(prev) => smoothing * prev + (1.0 - smoothing) * obs.reward,
                };
                self.reward_ema = Some(ema);
                let p = ((ema - reward_start) / (reward_target - reward_start)).clamp(0.0, 1.0);
                self.value = beta_min + (beta_max - beta_min) * p;
            }
            ControllerConfig::Lagrangian { target, lr, .. } => {
                self.value = (self.value + lr * (obs.kl - target)).max(0.0);
            }
        }
        Ok(self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(kl: f64, n: f64) -> ControllerObservation {
        ControllerObservation {
            kl,
            reward: 0.0,
            n_steps: n,
        }
    }

    #[test]
    fn adaptive_beta_after_a_known_kl_sequence() {
        let mut c = ControllerConfig::Adaptive {
            init_coef: 0.2,
            target: 0.1,
            horizon: 10_000.0,
        }
        .init()
        .unwrap();
        // kl 0.15: e = 0.5 -> clipped 0.2, mult 1 + 0.2*256/1e4 = 1.00512 -> 0.201024
        // kl 0.05: e = -0.5 -> -0.2, mult 0.99488 -> 0.199994757...
        // kl 0.11: e = 0.1, mult 1 + 0.1*256/1e4 = 1.00256 -> 0.200506744...
        let expected = [
            0.201_024,
            0.201_024 * 0.994_88,
            0.201_024 * 0.994_88 * 1.002_56,
        ];
        for (kl, want) in [0.15, 0.05, 0.11].into_iter().zip(expected) {
            let got = c.update(obs(kl, 256.0)).unwrap();
            assert!((got - want).abs() < 1e-12, "kl {kl}: {got} vs {want}");
        }
        assert!((c.value() - 0.200_506_744).abs() < 1e-8);
    }

    #[test]
    fn fixed_reward_adaptive_and_lagrangian() {
        let mut f = ControllerConfig::default().init().unwrap();
        assert_eq!(f.update(obs(5.0, 1.0)).unwrap(), 0.001);

        let mut r = ControllerConfig::RewardAdaptive {
            beta_min: 0.0,
            beta_max: 0.1,
            reward_start: 0.0,
            reward_target: 1.0,
            smoothing: 0.5,
        }
        .init()
        .unwrap();
        let step = |c: &mut Controller, reward| {
            c.update(ControllerObservation {
                kl: 0.0,
                reward,
                n_steps: 1.0,
            })
            .unwrap()
        };
        // ema 0.4 -> beta 0.04; ema 0.5*0.4 + 0.5*1.0 = 0.7 -> 0.07; ema 0.5*0.7+0.5*3 = 1.85 -> capped 0.1
        assert!((step(&mut r, 0.4) - 0.04).abs() < 1e-12);
        assert!((step(&mut r, 1.0) - 0.07).abs() < 1e-12);
        assert!((step(&mut r, 3.0) - 0.1).abs() < 1e-12);

        let mut l = ControllerConfig::Lagrangian {
            init_coef: 0.05,
            target: 0.1,
            lr: 0.1,
        }
        .init()
        .unwrap();
        // 0.05 + 0.1*(0.6-0.1) = 0.1; then 0.1 + 0.1*(0.0-0.1) = 0.09; then floor at 0
        assert!((l.update(obs(0.6, 1.0)).unwrap() - 0.1).abs() < 1e-12);
        assert!((l.update(obs(0.0, 1.0)).unwrap() - 0.09).abs() < 1e-12);
        assert_eq!(l.update(obs(-10.0, 1.0)).unwrap(), 0.0);
    }

    #[test]
    fn bad_parameters_and_observations_are_errors() {
        let bad = ControllerConfig::Adaptive {
            init_coef: 0.1,
            target: 0.0,
            horizon: 1.0,
        };
        assert!(matches!(
            bad.init(),
            Err(GoodhartError::InvalidArgument { .. })
        ));
        let mut c = ControllerConfig::default().init().unwrap();
        assert!(matches!(
            c.update(obs(f64::NAN, 1.0)),
            Err(GoodhartError::NonFinite { .. })
        ));
        let c: ControllerConfig = toml::from_str("kind = \"adaptive\"\ntarget = 6.0\n").unwrap();
        assert_eq!(
            c,
            ControllerConfig::Adaptive {
                init_coef: 0.001,
                target: 6.0,
                horizon: 10_000.0
            }
        );
        assert!(toml::from_str::<ControllerConfig>("kind = \"fixed\"\nbeta = 1.0\n").is_err());
    }
}
