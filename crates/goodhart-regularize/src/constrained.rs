//! Constrained RLHF with Lagrange multipliers (Moskovitz et al. 2023, "Confronting Reward
//! Model Overoptimization with Constrained RLHF").
//!
//! The policy maximises the KL reward (`-KL` to the reference) subject to each component
//! reward model's expected return meeting its threshold `theta_i` (its "proxy point",
//! beyond which it stops tracking quality). Each constraint has a multiplier
//! `lambda_i = sigmoid(l_i)` (inequality `v_i >= theta_i`) or `tanh(l_i)` (equality
//! `v_i = theta_i`), and the policy trains on the mixed advantage
//! `A = (N - sum_i lambda_i) A_KL + sum_i lambda_i A_i` (`N` constraints).
//!
//! Multipliers minimise `L(l) = sum_i lambda_i (mean return_i - theta_i)` by SGD (lr 0.1):
//! `l_i <- l_i - lr * lambda_i'(l_i) (mean return_i - theta_i)`.
//!
//! **Sign convention.** A constraint is *violated* when its mean return is below
//! `theta_i`; then `mean return_i - theta_i < 0` and, since `lambda'(l) > 0`, the step
//! raises `l_i` and `lambda_i`: the policy weighs component `i` more. Once the return
//! exceeds `theta_i` the multiplier falls, so the policy stops pushing that reward past
//! its proxy point (for `tanh`, `lambda_i` may turn negative and push it back down).

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{ops::check_same_shape, GoodhartError, Result};
use serde::{Deserialize, Serialize};

/// How a multiplier is parameterised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConstraintKind {
    /// `v_i >= theta_i`, `lambda = sigmoid(l)` in `(0, 1)`.
    #[default]
    Inequality,
    /// `v_i = theta_i`, `lambda = tanh(l)` in `(-1, 1)`.
    Equality,
}

impl ConstraintKind {
    fn lambda(self, l: f64) -> f64 {
        match self {
            Self::Inequality => 1.0 / (1.0 + (-l).exp()),
            Self::Equality => l.tanh(),
        }
    }

    fn dlambda(self, l: f64) -> f64 {
        let v = self.lambda(l);
        match self {
            Self::Inequality => v * (1.0 - v),
            Self::Equality => 1.0 - v * v,
        }
    }
}

/// One component's constraint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintConfig {
    /// Threshold `theta_i` on the component's mean return.
    pub threshold: f64,
    /// Inequality (sigmoid) or equality (tanh).
    #[serde(default)]
    pub kind: ConstraintKind,
    /// Initial logit `l_i` (default 0: `lambda = 0.5` for sigmoid, 0 for tanh).
    #[serde(default)]
    pub init_logit: f64,
}

/// Config of the `constrained` regulariser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstrainedConfig {
    /// One entry per component reward, in the order the advantages are passed.
    pub constraints: Vec<ConstraintConfig>,
    /// SGD learning rate of the multiplier logits (default 0.1, as the paper).
    #[serde(default = "default_lr")]
    pub lr: f64,
}

fn default_lr() -> f64 {
    0.1
}

impl ConstrainedConfig {
    /// Validates and builds the multipliers.
    pub fn init(&self) -> Result<ConstrainedRlhf> {
        if self.constraints.is_empty() {
            return Err(GoodhartError::Empty {
                what: "constraints".into(),
            });
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(GoodhartError::invalid(
                "lr",
                format!("must be > 0, got {}", self.lr),
            ));
        }
        for (i, c) in self.constraints.iter().enumerate() {
            if !(c.threshold.is_finite() && c.init_logit.is_finite()) {
                return Err(GoodhartError::invalid(
                    format!("constraints[{i}]"),
                    "threshold and init_logit must be finite",
                ));
            }
        }
        Ok(ConstrainedRlhf {
            logits: self.constraints.iter().map(|c| c.init_logit).collect(),
            config: self.clone(),
        })
    }
}

/// The multipliers' state.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstrainedRlhf {
    config: ConstrainedConfig,
    logits: Vec<f64>,
}

impl ConstrainedRlhf {
    /// Current multipliers `lambda_i`.
    pub fn lambdas(&self) -> Vec<f64> {
        self.config
            .constraints
            .iter()
            .zip(&self.logits)
            .map(|(c, &l)| c.kind.lambda(l))
            .collect()
    }

    /// Current logits `l_i`.
    pub fn logits(&self) -> &[f64] {
        &self.logits
    }

    fn check_returns(&self, returns: &[f64]) -> Result<()> {
        let n = self.logits.len();
        if returns.len() != n {
            return Err(GoodhartError::shape(
                "component returns",
                &[n],
                &[returns.len()],
            ));
        }
        if returns.iter().any(|r| !r.is_finite()) {
            return Err(GoodhartError::NonFinite {
                what: "component returns".into(),
            });
        }
        Ok(())
    }

    /// The multiplier loss `sum_i lambda_i (returns_i - theta_i)`.
    pub fn multiplier_loss(&self, returns: &[f64]) -> Result<f64> {
        self.check_returns(returns)?;
        Ok(self
            .lambdas()
            .iter()
            .zip(returns)
            .zip(&self.config.constraints)
            .map(|((l, r), c)| l * (r - c.threshold))
            .sum())
    }

    /// One SGD step on the multiplier loss from the batch's mean return per component;
    /// returns the new multipliers (see the module doc for the sign convention).
    pub fn update(&mut self, returns: &[f64]) -> Result<Vec<f64>> {
        self.check_returns(returns)?;
        for ((l, r), c) in self
            .logits
            .iter_mut()
            .zip(returns)
            .zip(&self.config.constraints)
        {
            *l -= self.config.lr * c.kind.dlambda(*l) * (r - c.threshold);
        }
        Ok(self.lambdas())
    }

    /// The mixed advantage `(N - sum lambda_i) A_KL + sum lambda_i A_i` for advantages of
    /// any shape; `components` are in the constraints' order.
    pub fn mix_advantages<B: Backend, const D: usize>(
        &self,
        a_kl: Tensor<B, D>,
        components: &[Tensor<B, D>],
    ) -> Result<Tensor<B, D>> {
        let n = self.logits.len();
        if components.len() != n {
            return Err(GoodhartError::shape(
                "component advantages",
                &[n],
                &[components.len()],
            ));
        }
        let lambdas = self.lambdas();
        let mut out = a_kl.clone() * (n as f64 - lambdas.iter().sum::<f64>());
        for (a, l) in components.iter().zip(lambdas) {
            check_same_shape(&a_kl, "a_kl", a, "component advantage")?;
            out = out + a.clone() * l;
        }
        Ok(out)
    }
}

/// The multipliers as a [`crate::Regularizer`]: no reward or loss term of their own (the
/// algorithm calls [`ConstrainedRlhf::mix_advantages`]); [`crate::Regularizer::observe`]
/// takes one SGD step from [`crate::StepStats::component_returns`].
impl<B: Backend> crate::Regularizer<B> for ConstrainedRlhf {
    fn name(&self) -> &'static str {
        "constrained"
    }

    fn observe(&mut self, stats: &crate::StepStats) -> Result<()> {
        self.update(&stats.component_returns).map(|_| ())
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        self.lambdas()
            .into_iter()
            .enumerate()
            .map(|(i, l)| (format!("constrained/lambda_{i}"), l))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, tolerance, values};

    fn two() -> ConstrainedRlhf {
        ConstrainedConfig {
            constraints: vec![
                ConstraintConfig {
                    threshold: 1.0,
                    kind: ConstraintKind::Inequality,
                    init_logit: 0.0,
                },
                ConstraintConfig {
                    threshold: 0.5,
                    kind: ConstraintKind::Equality,
                    init_logit: 0.0,
                },
            ],
            lr: 0.1,
        }
        .init()
        .unwrap()
    }

    #[test]
    fn violated_raises_then_satisfied_lowers_the_multiplier() {
        let mut c = two();
        assert_eq!(c.lambdas(), vec![0.5, 0.0]);
        // Violated: return 0 < 1: l0 <- 0 - 0.1 * 0.25 * (0 - 1) = 0.025; lambda = sigmoid(0.025)
        // equality: return 0 < 0.5: l1 <- 0 - 0.1 * 1 * (0 - 0.5) = 0.05; lambda = tanh(0.05)
        let l = c.update(&[0.0, 0.0]).unwrap();
        assert!((l[0] - 1.0 / (1.0 + (-0.025f64).exp())).abs() < 1e-12 && l[0] > 0.5);
        assert!((l[1] - 0.05f64.tanh()).abs() < 1e-12 && l[1] > 0.0);
        let mut prev = l;
        for _ in 0..5 {
            let now = c.update(&[0.0, 0.0]).unwrap();
            assert!(now[0] > prev[0] && now[1] > prev[1]);
            prev = now;
        }
        // Satisfied (returns above thresholds): both fall; the equality one goes negative.
        for _ in 0..20 {
            let now = c.update(&[3.0, 2.0]).unwrap();
            assert!(now[0] < prev[0] && now[1] < prev[1]);
            prev = now;
        }
        assert!(prev[0] < 0.5 && prev[1] < 0.0);
        assert!(c.update(&[f64::NAN, 0.0]).is_err());
        assert!(matches!(
            c.update(&[0.0]),
            Err(GoodhartError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn multiplier_loss_by_hand() {
        // 0.5 * (2 - 1) + 0 * (...) = 0.5
        assert_eq!(two().multiplier_loss(&[2.0, 7.0]).unwrap(), 0.5);
    }

    goodhart_core::backend_test! {
        fn mixed_advantage_by_hand<B>(device) {
            let mut c = two();
            // push the equality multiplier to tanh(0.05) and the inequality one to sigmoid(0.025)
            let l = c.update(&[0.0, 0.0]).unwrap();
            let a_kl = Tensor::<B, 1>::from_floats([1.0, -1.0], device);
            let a1 = Tensor::<B, 1>::from_floats([2.0, 0.0], device);
            let a2 = Tensor::<B, 1>::from_floats([0.0, 4.0], device);
            let mixed = values(c.mix_advantages(a_kl, &[a1, a2]).unwrap());
            let w = 2.0 - l[0] - l[1];
            let want = [(w + 2.0 * l[0]) as f32, (-w + 4.0 * l[1]) as f32];
            assert_close(&mixed, &want, tolerance(1e-6));
        }
    }
}
