//! Reference-policy management over any burn [`Module`]: a frozen snapshot, an EMA
//! reference, and resets (periodic or on a KL threshold).
//!
//! - Frozen (verl / TRL / OpenRLHF default): the reference is the initial policy, a
//!   copy without gradients ([`snapshot`], or [`AutodiffModule::valid`] for the inner
//!   backend).
//! - EMA: `p_ref <- tau p_ref + (1 - tau) p` after each step ([`ema_update`]; TRL's
//!   `sync_ref_model` uses `ref_model_mixup_alpha` = `1 - tau` = 0.6 every 512 steps;
//!   TR-DPO, Gorbatovski et al. 2024).
//! - Reset: the reference becomes a copy of the current policy every `period` steps or
//!   when the KL to it exceeds a threshold (GARDO; TRL's hard sync).

use burn::{
    module::{AutodiffModule, Module},
    tensor::backend::Backend,
};
use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

pub use goodhart_core::params::{ema_update, materialize, snapshot};

/// The frozen reference on the inner (non-autodiff) backend: cheaper forward passes.
pub fn frozen_inner<B: burn::tensor::backend::AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
) -> M::InnerModule {
    module.valid()
}

/// When to reset the reference to the current policy.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRule {
    /// Reset when the KL to the reference exceeds this.
    #[serde(default)]
    pub kl_threshold: Option<f64>,
    /// Reset every `period` steps (since the last reset).
    #[serde(default)]
    pub period: Option<usize>,
}

impl ResetRule {
    /// Whether to reset at `steps_since_reset` with the current `kl`.
    pub fn should_reset(&self, steps_since_reset: usize, kl: f64) -> bool {
        self.kl_threshold.is_some_and(|t| kl > t)
            || self.period.is_some_and(|p| p > 0 && steps_since_reset >= p)
    }
}

/// How the reference evolves.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReferenceMode {
    /// Never changes.
    #[default]
    Frozen,
    /// EMA with weight `tau` on the old reference.
    Ema {
        /// Weight of the old reference.
        tau: f64,
    },
    /// Copy of the policy on a [`ResetRule`].
    Reset {
        /// Reset when the KL to the reference exceeds this.
        #[serde(default)]
        kl_threshold: Option<f64>,
        /// Reset every `period` steps.
        #[serde(default)]
        period: Option<usize>,
    },
}

/// A reference policy and its update rule.
#[derive(Debug, Clone)]
pub struct ReferencePolicy<M> {
    module: M,
    mode: ReferenceMode,
    steps_since_reset: usize,
    resets: usize,
}

impl<M> ReferencePolicy<M> {
    /// The reference module.
    pub fn module(&self) -> &M {
        &self.module
    }

    /// Number of resets so far.
    pub fn resets(&self) -> usize {
        self.resets
    }

    /// A frozen snapshot of `policy` as the reference, updated by `mode`.
    pub fn new<B: Backend>(policy: &M, mode: ReferenceMode) -> Self
    where
        M: Module<B>,
    {
        Self {
            module: snapshot(policy),
            mode,
            steps_since_reset: 0,
            resets: 0,
        }
    }

    /// After one optimiser step: applies the mode (EMA blend, or reset on the rule given
    /// the batch `kl` to the reference). Returns whether the reference was reset.
    pub fn step<B: Backend>(&mut self, policy: &M, kl: f64) -> Result<bool>
    where
        M: Module<B>,
    {
        if !kl.is_finite() {
            return Err(GoodhartError::NonFinite {
                what: "kl to the reference".into(),
            });
        }
        self.steps_since_reset += 1;
        match self.mode {
            ReferenceMode::Frozen => Ok(false),
            ReferenceMode::Ema { tau } => {
                self.module = ema_update(self.module.clone(), policy, tau)?;
                Ok(false)
            }
            ReferenceMode::Reset {
                kl_threshold,
                period,
            } => {
                let rule = ResetRule {
                    kl_threshold,
                    period,
                };
                if rule.should_reset(self.steps_since_reset, kl) {
                    self.module = snapshot(policy);
                    self.steps_since_reset = 0;
                    self.resets += 1;
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    fn weights<B: Backend>(l: &Linear<B>) -> Vec<f32> {
        let mut v = values(l.weight.val());
        v.extend(values(l.bias.as_ref().unwrap().val()));
        v
    }

    goodhart_core::backend_test! {
        fn ema_snapshot_and_reset<B>(device) {
            type A<B> = Autodiff<B>;
            // Drawn under `seeded`'s lock: this binary also asserts seeded draws exactly.
            let (policy, other) = goodhart_core::seed::seeded::<A<B>, _>(device, 0, "test", || {
                let policy: Linear<A<B>> = goodhart_core::params::materialized(LinearConfig::new(2, 2).init(device));
                let other: Linear<A<B>> = goodhart_core::params::materialized(LinearConfig::new(3, 2).init(device));
                (policy, other)
            });
            let frozen = snapshot(&policy);
            assert!(!frozen.weight.val().is_require_grad());
            assert_close(&weights(&frozen), &weights(&policy), 0.0);
            // a "trained" policy: every parameter + 1
            let moved = Linear { weight: policy.weight.clone().map(|w| w + 1.0), bias: policy.bias.clone().map(|b| b.map(|b| b + 1.0)) };
            let ema = ema_update(frozen.clone(), &moved, 0.75).unwrap();
            // 0.75 p + 0.25 (p + 1) = p + 0.25
            let want: Vec<f32> = weights(&frozen).iter().map(|p| p + 0.25).collect();
            assert_close(&weights(&ema), &want, tolerance(1e-6));
            assert!(ema_update(frozen.clone(), &moved, 1.5).is_err());
            assert!(matches!(ema_update(frozen.clone(), &other, 0.5), Err(GoodhartError::ShapeMismatch { .. })));

            let mut r = ReferencePolicy::new(&policy, ReferenceMode::Reset { kl_threshold: Some(0.5), period: Some(3) });
            assert!(!r.step(&moved, 0.1).unwrap());
            assert!(r.step(&moved, 0.9).unwrap()); // over the KL threshold
            assert_close(&weights(r.module()), &weights(&moved), 0.0);
            assert!(!r.step(&moved, 0.0).unwrap());
            assert!(!r.step(&moved, 0.0).unwrap());
            assert!(r.step(&moved, 0.0).unwrap()); // period 3
            assert_eq!(r.resets(), 2);
            let mut e = ReferencePolicy::new(&policy, ReferenceMode::Ema { tau: 0.5 });
            e.step(&moved, 0.0).unwrap();
            let want: Vec<f32> = weights(&frozen).iter().map(|p| p + 0.5).collect();
            assert_close(&weights(e.module()), &want, tolerance(1e-6));
            assert!(e.step(&moved, f64::NAN).is_err());
        }
    }
}
